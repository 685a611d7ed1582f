"""GroupNorm across 2 and 4 real processes (gloo on 127.0.0.1): a tensor sharded along a spatial
axis normalizes, forward and backward, as the whole tensor does in the float64 reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import groupnorm
from groupnorm import reference as R
from groupnorm.convert import GroupNormDropAct
from groupnorm.distributed import all_gather_stats
from groupnorm.functional import resolve_plan
from tests._dropped import dropped_reference
from tests._gloo import free_port, run_rank
from tests._inputs import make_x, rand
from tests._tolerances import assert_matches, to_numpy

SHAPE = (2, 12, 11, 7)  # H = 11 splits unevenly over 2 and 4 ranks
PLAN: dict[str, Any] = {"num_groups": 5, "uneven": True}


def _inputs() -> dict[str, torch.Tensor]:
    """The whole tensors every rank rebuilds from seeds, then shards."""
    mask = torch.rand((2, 1, 11, 7), generator=torch.Generator().manual_seed(5)) > 0.4
    mask[0, :, :6] = False  # sample 0: masked on the first rank(s) entirely
    return {
        "x": make_x(SHAPE, torch.float64, "channels_last", seed=1),
        "weight": rand((12,), torch.float64, 2) * 0.5 + 1,
        "bias": rand((12,), torch.float64, 3),
        "scale": rand((2, 12), torch.float64, 4) * 0.3,
        "shift": rand((2, 12), torch.float64, 6),
        "dy": rand(SHAPE, torch.float64, 7),
        "offset_x": make_x((2, 8, 9, 16), torch.float32, seed=8, loc=1e4, std=1e-2),
        "x5": make_x((2, 8, 6, 3, 4), torch.float64, seed=9),
        "dy5": rand((2, 8, 6, 3, 4), torch.float64, 10),
        "mask": mask,
        "small_x": make_x((4, 6, 2, 2), torch.float32, seed=11, loc=0.5, std=0.02),
        "small_w": rand((6,), torch.float32, 12) + 2,
        "small_dy": rand((4, 6, 2, 2), torch.float32, 13),
    }


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _worker(rank: int, world: int, port: int, out: str, cases: str) -> None:
    def body() -> None:
        torch.set_num_threads(1)
        pg = dist.group.WORLD
        run = {
            "whole": _whole_cases,
            "regression": _regression_cases,
            "dims": _dims_cases,
            "module": _module_cases,
        }
        result = run[cases](rank, world, pg)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))

    run_rank(rank, world, port, body)


def _spawn(world: int, out: Path, cases: str) -> list[dict[str, Any]]:
    tmp.spawn(_worker, args=(world, free_port(), str(out), cases), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _whole_cases(rank: int, world: int, pg: Any) -> dict[str, torch.Tensor | None]:
    full = _inputs()
    result: dict[str, torch.Tensor | None] = {}

    def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.tensor_split(t, world, dim=dim)[rank]

    # Every epilogue, uneven groups, channels-last, split along H; forward and backward.
    x = _leaf(shard(full["x"], 2))
    params: dict[str, Any] = {k: _leaf(full[k]) for k in ("weight", "bias", "scale", "shift")}
    y = groupnorm.group_norm(x, **PLAN, **params, activation="silu", process_group=pg)
    y.backward(shard(full["dy"], 2))
    result["y"], result["dx"] = y.detach(), x.grad
    result.update({f"d{k}": v.grad for k, v in params.items()})

    # float32, mean 1e4 and std 1e-2, split along W: the merge keeps the shifted precision.
    result["offset_y"] = groupnorm.group_norm(shard(full["offset_x"], 3), 4, process_group=pg)

    # The module option on a 5-D input split along D.
    module = groupnorm.GroupNorm(4, 8, process_group=pg).double()
    x5 = _leaf(shard(full["x5"], 2))
    y5 = module(x5)
    y5.backward(shard(full["dy5"], 2))
    result["y5"], result["dx5"] = y5.detach(), x5.grad

    # Masked: sample 0 has no valid position on the first rank(s).
    xm = _leaf(shard(full["x"], 2))
    ym = groupnorm.group_norm(xm, 4, mask=shard(full["mask"], 2), process_group=pg)
    ym.backward(shard(full["dy"], 2))
    result["ym"], result["dxm"] = ym.detach(), xm.grad
    return result


def _regression_cases(rank: int, world: int, pg: Any) -> dict[str, Any]:
    """Rank 1 holds every row, the others none; float32 groups of one channel (4 positions) at
    std 0.02, where dx cancels. A gradient penalty's double backward; calls whose ranks
    disagree on N or the plan; torch.jit with process_group=; GroupNormDropAct's fused call
    with process_group=."""
    full = _inputs()
    rows = slice(0, 2) if rank == 1 else slice(0, 0)
    xs, ws = _leaf(full["small_x"][:, :, rows]), _leaf(full["small_w"])
    ys = groupnorm.group_norm(xs, 6, ws, activation="silu", process_group=pg)
    ys.backward(full["small_dy"][:, :, rows])
    result: dict[str, Any] = {"ys": ys.detach(), "dxs": xs.grad, "dws": ws.grad}

    x2 = _leaf(torch.tensor_split(full["x"], world, dim=2)[rank])
    dy2 = torch.tensor_split(full["dy"], world, dim=2)[rank]
    y2 = groupnorm.group_norm(x2, **PLAN, process_group=pg)
    (dx2,) = torch.autograd.grad((y2 * dy2).sum(), x2, create_graph=True)
    dx2.square().sum().backward()
    result["ddx"] = x2.grad
    # The converters' norm-and-activation layer with its activation fused.
    drop_act = GroupNormDropAct(num_channels=12, **PLAN, act=torch.nn.SiLU(), process_group=pg)
    result["y_drop_act"] = drop_act.double()(x2.detach()).detach()

    def error(call: Any) -> str:
        try:
            call()
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    n = 2 + rank % 2  # N = 2 on even ranks, 3 on odd ones
    result["error_n"] = error(
        lambda: groupnorm.group_norm(torch.randn(n, 8, 2, 2), 2, process_group=pg)
    )
    sizes = [3, 5] if rank % 2 else [4, 4]
    result["error_plan"] = error(
        lambda: groupnorm.group_norm(torch.randn(2, 8, 2, 2), group_sizes=sizes, process_group=pg)
    )
    # One rank's own arguments refused: every rank raises (the others waited in the gather).
    eps = -1.0 if rank == 1 else 1e-5
    result["error_local"] = error(
        lambda: groupnorm.group_norm(torch.randn(2, 8, 2, 2), 2, eps=eps, process_group=pg)
    )
    stats = groupnorm.group_stats(torch.randn(2, 8, 2, 2), 2) if rank == 0 else None
    result["error_stats"] = error(
        lambda: groupnorm.group_norm(torch.randn(2, 8, 2, 2), 2, stats=stats, process_group=pg)
    )
    dtype = torch.float64 if rank else torch.float32
    result["error_dtype"] = error(
        lambda: groupnorm.group_norm(torch.randn(2, 8, 2, 2, dtype=dtype), 2, process_group=pg)
    )
    module = groupnorm.GroupNorm(2, 8, process_group=pg)
    result["error_module"] = error(lambda: module(torch.randn(2, 8 + 2 * rank, 2, 2)))
    # A tuple for the statistics had raised AttributeError ('tuple' object has no attribute
    # 'plan'), then a TypeError on that rank alone while the others waited.
    local = groupnorm.group_stats(torch.randn(2, 8, 2, 2), 2) if rank == 0 else (1, 2)
    result["error_gather"] = error(lambda: all_gather_stats(local, pg))  # type: ignore[arg-type]
    free = groupnorm.GroupNorm(4, 8, affine=False, process_group=pg)  # planned before the call
    result["error_free"] = error(lambda: free(torch.randn(2, 8 - 2 * rank, 2, 2)))
    result["error_script"] = error(lambda: torch.jit.script(module))
    result["error_trace"] = error(lambda: torch.jit.trace(module, (torch.randn(2, 8, 2, 2),)))
    result["after_errors"] = groupnorm.group_norm(torch.randn(2, 8, 2, 2), 2, process_group=pg)
    return result


def _dims_cases(rank: int, world: int, pg: Any) -> dict[str, Any]:
    """Rank 0 holds an (N, C, H, W) shard, rank 1 an (N, C, L) one, through the function and
    the module; then shards of one rank and different spatial sizes, as a split gives."""
    x = make_x((2, 8, 3, 4), torch.float32, seed=21)
    shard = x if rank == 0 else x.flatten(2)
    result: dict[str, Any] = {}
    for name, call in (
        ("function", lambda: groupnorm.group_norm(shard, 2, process_group=pg)),
        ("module", lambda: groupnorm.GroupNorm(2, 8, process_group=pg)(shard)),
    ):
        try:
            call()
            result[name] = "no error"
        except ValueError as e:
            result[name] = str(e)
    whole = make_x((2, 8, 5, 4), torch.float32, seed=22)
    result["x"] = whole
    result["y"] = groupnorm.group_norm(whole[:, :, 3 * rank : 3 + 2 * rank], 2, process_group=pg)
    return result


def _modules() -> list[tuple[groupnorm.GroupNorm, torch.Tensor]]:
    """Modules of 8 channels (even, uneven, explicit sizes) and, for rank 1, an x of 10."""
    x = torch.randn(2, 10, 2, 2)
    return [
        (groupnorm.GroupNorm(2, 8), x),
        (groupnorm.GroupNorm(3, 8, uneven=True), x),
        (groupnorm.GroupNorm(num_channels=8, group_sizes=[2, 6]), x),
    ]


def _module_cases(rank: int, world: int, pg: Any) -> dict[str, Any]:
    """Each of :func:`_modules` with process_group=, called with x of 8 channels on rank 0 and
    of 10 on rank 1: the errors each rank raises."""
    errors = []
    for module, x in _modules():
        module.process_group = pg
        try:
            module(x[:, :8] if rank == 0 else x)
            errors.append("no error")
        except (ValueError, TypeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    return {"errors": errors}


@pytest.mark.slow
def test_regression_sharded_module_of_other_channels_named_group_sizes(tmp_path: Path) -> None:
    """A GroupNorm with process_group= given x of 10 channels for its 8 said "group_sizes=[4,
    4] must be positive and sum to num_channels=10": the group_sizes= the module passes to
    group_norm, which the user never gave. It now says what the module without process_group=
    says ("expected x with 8 channels (dim 1) for 2 groups of 4"), and the other rank, which
    waited, that rank 1 refused."""
    ranks = _spawn(2, tmp_path, "module")
    refused = "ValueError: process_group=: rank 1 refused its arguments (its own error says why)"
    for i, (module, x) in enumerate(_modules()):
        with pytest.raises(ValueError) as alone:
            module(x)
        assert ranks[1]["errors"][i] == f"ValueError: {alone.value}"
        assert "group_sizes" not in ranks[1]["errors"][i]
        assert ranks[0]["errors"][i].startswith(refused)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_group_norm_matches_the_whole_tensor(world: int, tmp_path: Path) -> None:
    ranks = _spawn(world, tmp_path, "whole")
    full = _inputs()

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([r[key] for r in ranks], dim=dim)

    def total(key: str) -> torch.Tensor:  # per-rank parameter gradients, all-reduced
        return torch.stack([r[key] for r in ranks]).sum(0)

    np64 = {k: to_numpy(v) for k, v in full.items()}
    plan = resolve_plan(12, **PLAN)
    expected, cache = R.group_norm_forward(
        np64["x"],
        plan=plan,
        gamma=np64["weight"],
        beta=np64["bias"],
        activation="silu",
        scale=np64["scale"],
        shift=np64["shift"],
    )
    f64 = torch.float64
    group = max(plan.sizes) * 11 * 7
    assert_matches(cat("y", 2), expected, f64, what="y")
    grads = R.group_norm_backward(np64["dy"], cache)
    assert_matches(cat("dx", 2), grads.dx, f64, reduction=group, what="dx")
    assert_matches(total("dweight"), grads.dgamma, f64, reduction=2 * group, what="dweight")
    assert_matches(total("dbias"), grads.dbeta, f64, reduction=2 * group, what="dbias")
    assert_matches(total("dscale"), grads.dscale, f64, reduction=group, what="dscale")
    assert_matches(total("dshift"), grads.dshift, f64, reduction=group, what="dshift")

    offset = to_numpy(full["offset_x"])
    expected_offset, _ = R.group_norm_forward(offset, 4)
    assert_matches(cat("offset_y", 3), expected_offset, torch.float32, what="offset y")

    expected5, cache5 = R.group_norm_forward(np64["x5"], 4)
    assert_matches(cat("y5", 2), expected5, f64, what="module y")
    grads5 = R.group_norm_backward(np64["dy5"], cache5)
    assert_matches(cat("dx5", 2), grads5.dx, f64, reduction=2 * 6 * 3 * 4, what="module dx")

    xm = full["x"].detach().clone().requires_grad_()
    ym = dropped_reference(xm, resolve_plan(12, 4), full["mask"])
    ym.backward(full["dy"])
    assert_matches(cat("ym", 2), to_numpy(ym), f64, what="masked y")
    assert_matches(cat("dxm", 2), to_numpy(xm.grad), f64, reduction=group, what="masked dx")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_regression_ranks_without_rows_and_float32_backward_of_small_groups(
    world: int, tmp_path: Path
) -> None:
    """A rank whose shard held no position raised "empty spatial dimension" (and left the
    others in a collective); float32 dx of groups of a few elements reached 1.8x the bound."""
    ranks = _spawn(world, tmp_path, "regression")
    np64 = {k: to_numpy(v) for k, v in _inputs().items()}
    expected, cache = R.group_norm_forward(
        np64["small_x"], plan=resolve_plan(6, 6), gamma=np64["small_w"], activation="silu"
    )
    grads = R.group_norm_backward(np64["small_dy"], cache)
    f32 = torch.float32
    assert_matches(torch.cat([r["ys"] for r in ranks], 2), expected, f32, what="y")
    dx = torch.cat([r["dxs"] for r in ranks], 2)
    assert_matches(dx, grads.dx, f32, reduction=4, what="dx")
    dweight = torch.stack([r["dws"] for r in ranks]).sum(0)
    assert_matches(dweight, grads.dgamma, f32, reduction=16, what="dweight")


@pytest.mark.slow
def test_regression_double_backward_rank_disagreement_and_torchscript(tmp_path: Path) -> None:
    """The gather's backward all-reduced outside autograd: a gradient penalty's second-order
    gradient was off by 1.1 with no error. Ranks calling with different N aborted a gloo
    process; different plans of the same G merged into wrong statistics; torch.jit.script
    dropped process_group= (each rank normalized its shard alone) and torch.jit.trace failed
    inside the collective. A rank whose own arguments were refused left the others waiting in
    the agreement check's gather. GroupNormDropAct's fused call ignored process_group= (0.73 off
    with SiLU)."""
    ranks = _spawn(2, tmp_path, "regression")
    full = _inputs()
    x = full["x"].detach().clone().requires_grad_()
    plan = resolve_plan(12, **PLAN)
    ones = torch.ones((), dtype=torch.bool)
    (dx,) = torch.autograd.grad(
        (dropped_reference(x, plan, ones) * full["dy"]).sum(), x, create_graph=True
    )
    dx.square().sum().backward()
    ddx = torch.cat([r["ddx"] for r in ranks], 2)
    assert_matches(ddx, to_numpy(x.grad), torch.float64, reduction=max(plan.sizes) * 77)
    expected, _ = R.group_norm_forward(to_numpy(full["x"]), plan=plan, activation="silu")
    y_drop_act = torch.cat([r["y_drop_act"] for r in ranks], 2)
    assert_matches(y_drop_act, expected, torch.float64, what="GroupNormDropAct y")
    for r in ranks:
        assert r["error_n"].startswith("ValueError: process_group=: every rank must call")
        assert "rank 0: N=2, C=8, rank 1: N=3, C=8" in r["error_n"]
        assert "different group plans" in r["error_plan"]
        assert r["error_script"].startswith("TypeError: torch.jit.script cannot compile")
        assert r["error_trace"].startswith("TypeError: torch.jit.trace cannot record")
        assert r["after_errors"].shape == (2, 8, 2, 2)
    refused = "ValueError: process_group=: rank {} refused its arguments (its own error says why)"
    assert ranks[0]["error_local"].startswith(refused.format(1))
    assert "eps must be a finite number >= 0" in ranks[1]["error_local"]
    assert "process_group= and stats= together" in ranks[0]["error_stats"]
    assert ranks[1]["error_stats"].startswith(refused.format(0))
    for rank, r in enumerate(ranks):  # shards of two dtypes had merged without an error
        assert "and different dtypes (this rank: 2 groups of 4, " in r["error_dtype"]
        assert r["error_dtype"].endswith(f"torch.float{64 if rank else 32})")
    assert ranks[0]["error_gather"].startswith(refused.format(1))
    assert "all_gather_stats(local=...) needs a GroupStats" in ranks[1]["error_gather"]
    assert ranks[0]["error_free"].startswith(refused.format(1))
    assert "num_groups=4 does not divide num_channels=6" in ranks[1]["error_free"]
    assert ranks[0]["error_module"].startswith(refused.format(1))
    assert "expected x with 8 channels (dim 1) for 2 groups of 4" in ranks[1]["error_module"]


def test_process_group_needs_torch_distributed_initialized() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        groupnorm.group_norm(make_x((2, 4, 3, 3), torch.float32), 2, process_group=object())


def test_regression_merged_pivot_is_rounded_to_the_stats_dtype() -> None:
    """The merged means are taken relative to the common pivot; with it kept in float64 while
    the stored pivot was its float32 rounding, a mean-1e4 input was off by half an ulp(1e4)
    (5e-4, i.e. 0.05 after normalization by std 1e-2)."""
    from groupnorm.distributed import merge_many

    x = make_x((2, 8, 9, 16), torch.float32, seed=8, loc=1e4, std=1e-2)
    parts = [groupnorm.group_stats(t, 4) for t in x.tensor_split(3, dim=3)]
    every = torch.stack(
        [torch.stack([s.pivot, s.shifted_mean, s.m2, s.count]) for s in parts]
    )  # (W, 4, N, G)
    plan = parts[0].plan
    assert plan is not None
    merged = merge_many(every, torch.float32, plan)
    y = groupnorm.group_norm(x, 4, stats=merged)
    expected, _ = R.group_norm_forward(to_numpy(x), 4)
    assert_matches(y, expected, torch.float32)


@pytest.mark.slow
def test_regression_ranks_with_different_numbers_of_dimensions_are_refused(
    tmp_path: Path,
) -> None:
    """Ranks compared N, C, the plan and the dtype but not x.dim(): one rank's (2, 8, 3, 4)
    shard and another's (2, 8, 12) were merged as parts of one tensor, without an error, and
    each rank got an output of its own shape. Every rank now raises, naming each rank's number
    of dimensions; shards of different spatial sizes (H = 3 and 2) still merge."""
    ranks = _spawn(2, tmp_path, "dims")
    for r in ranks:
        for call in ("function", "module"):
            assert r[call].startswith("process_group=: every rank must call with the same N, C, ")
            assert "different numbers of dimensions (rank 0: 4, rank 1: 3)" in r[call], r[call]
    expected, _ = R.group_norm_forward(to_numpy(ranks[0]["x"]), 2)
    assert_matches(torch.cat([r["y"] for r in ranks], 2), expected, torch.float32)
