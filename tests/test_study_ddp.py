"""Two real processes on gloo (127.0.0.1): per-device BatchNorm statistics differ from the
single-process full-batch ones and match the one-process emulation; GroupNorm's outputs do not
depend on how the batch is split; SyncBN matches the full batch; the distributed study runs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch import nn

from groupnorm import reference as ref
from groupnorm.study.models import ResNet, make_norm, set_synchronized, set_virtual_devices
from groupnorm.study.runner import RUNNING
from tests._gloo import exit_now
from tests._tolerances import assert_matches

pytestmark = pytest.mark.slow  # spawns gloo process groups and a distributed study

N, C_IN, S = 3, 3, 6  # images per device, input channels, spatial size
WORLD = 2


def _ports() -> tuple[int, int, int]:
    """Three distinct free ports on 127.0.0.1 (all held while choosing)."""
    with socket.socket() as a, socket.socket() as b, socket.socket() as c:
        for s in (a, b, c):
            s.bind(("127.0.0.1", 0))
        return int(a.getsockname()[1]), int(b.getsockname()[1]), int(c.getsockname()[1])


def _input() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    # Device 1's images are shifted and scaled: its batch statistics differ from device 0's.
    x = torch.randn(WORLD * N, C_IN, S, S, generator=gen)
    x[N:] = x[N:] * 2.5 + 1.5
    return x


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    kw = {"num_groups": 2} if norm == "gn" else {}
    return ResNet(make_norm("bn" if norm == "syncbn" else norm, **kw), width=4, num_classes=5)


def _capture(model: nn.Module) -> dict[str, torch.Tensor]:
    """Record the stem norm's input and output on the next forward."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["input"], seen["output"] = args[0].detach().clone(), out.detach().clone()

    model.stem_norm.register_forward_hook(hook)
    return seen


def _worker(rank: int, ports: tuple[int, int, int], out: str) -> None:
    """Both checks in one pair of processes (starting them is most of the cost): the layers,
    then the distributed study through the CLI, as torchrun would start it."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[1]),
    )
    _layers(rank, ports[0], out)
    from groupnorm.cli import main

    study = ["study", "--preset", "tiny", "--norms", "bn,gn", "--batches", "2", "--seeds", "1"]
    study += ["--device", "cpu", "--no-progress", "--out"]
    assert main([*study, os.path.join(out, "ddp")]) == 0
    # A folder another study holds (the test's process): every rank refuses it. A study of its
    # own store, as torchrun starts each: on the first one's port a rank could reach rank 0's
    # old store while it closed ("Broken pipe" in init_process_group, once in CI).
    os.environ["MASTER_PORT"] = str(ports[2])
    assert main([*study, os.path.join(out, "held")]) == 2
    exit_now()


def _layers(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.set_num_threads(1)
        x = _input()[rank * N : (rank + 1) * N]
        result = {}
        for norm in ("bn", "gn", "syncbn"):
            model = _model(norm)
            set_virtual_devices(model, 1)
            set_synchronized(model, norm == "syncbn")
            seen = _capture(model)
            ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            ddp.train()
            logits = ddp(x)
            logits.square().mean().backward()  # the all-reduce of the gradients runs
            result[norm] = {
                "input": seen["input"],
                "output": seen["output"],
                "logits": logits.detach(),
                "grad": model.stem.weight.grad.clone(),
            }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no peer still sends when a rank tears gloo down
    finally:
        dist.destroy_process_group()


def test_per_device_bn_on_two_gloo_processes(tmp_path: Path) -> None:
    """(Regression: a study under torchrun wrote into a folder another study held.)"""
    held = tmp_path / "held"
    held.mkdir()
    (held / RUNNING).write_text(str(os.getpid()))
    tmp.spawn(_worker, args=(_ports(), str(tmp_path)), nprocs=WORLD, join=True)
    _check_layers(tmp_path)
    _check_study(tmp_path / "ddp")
    assert sorted(p.name for p in held.iterdir()) == [RUNNING]


def _check_layers(tmp_path: Path) -> None:
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    def cat(norm: str, what: str) -> torch.Tensor:
        return torch.cat([r[norm][what] for r in ranks])

    # BatchNorm: each process normalized its own N images.
    x_in = cat("bn", "input").double().numpy()
    g, b = np.ones(4), np.zeros(4)
    per_device = np.concatenate(
        [ref.batch_norm(x_in[k * N : (k + 1) * N], g, b)[0] for k in range(WORLD)]
    )
    full = ref.batch_norm(x_in, g, b)[0]
    y = cat("bn", "output")
    assert_matches(y, per_device, torch.float32, reduction=N * S * S, what="DDP BN")
    assert np.abs(y.double().numpy() - full).max() > 0.1, "BN must differ from the full batch"
    # The one-process emulation with 2 virtual devices gives the same outputs.
    emulated = _model("bn")
    set_virtual_devices(emulated, WORLD)
    seen = _capture(emulated)
    emulated.train()
    logits_emulated = emulated(_input())
    assert_matches(
        seen["output"], per_device, torch.float32, reduction=N * S * S, what="emulated BN"
    )
    torch.testing.assert_close(cat("bn", "logits"), logits_emulated.detach())
    # Single process, whole batch: different logits.
    whole_bn = _model("bn")
    whole_bn.train()
    assert (whole_bn(_input()) - cat("bn", "logits")).abs().max() > 1e-3

    # SyncBN: statistics over both processes' images, as the full batch.
    assert_matches(
        cat("syncbn", "output"),
        ref.batch_norm(cat("syncbn", "input").double().numpy(), g, b)[0],
        torch.float32,
        reduction=WORLD * N * S * S,
        what="SyncBN",
    )

    # ... and its backward (our differentiable all-reduce): DDP's averaged gradient is the
    # gradient of one process on the whole batch.
    whole = _model("syncbn")
    whole.train()
    whole(_input()).square().mean().backward()
    for r in ranks:
        torch.testing.assert_close(r["syncbn"]["grad"], whole.stem.weight.grad)
    assert (ranks[0]["bn"]["grad"] - whole.stem.weight.grad).abs().max() > 1e-4

    # GroupNorm: the split does not matter; same as one process on the whole batch.
    gn_in = cat("gn", "input").double().numpy()
    assert_matches(
        cat("gn", "output"),
        ref.group_norm_forward(gn_in, 2)[0],
        torch.float32,
        reduction=2 * S * S,
        what="DDP GN",
    )
    single = _model("gn")
    single.train()
    torch.testing.assert_close(cat("gn", "logits"), single(_input()).detach())


def _check_study(out: Path) -> None:
    """The distributed study: both runs recorded once, by rank 0, with W = world size."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == ["bn-N2-s0", "gn-G16-N2-s0"]
    assert all(r["processes"] == WORLD for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["workers"] == WORLD
    assert (out / "report.md").exists()


def test_regression_a_finished_distributed_study_loaded_its_data_to_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun, rank 0 fetched, loaded and checked the data, then every rank loaded it
    again, for a study whose every run was recorded (one gloo rank here)."""
    from dataclasses import asdict

    from groupnorm.study import distributed, runner
    from groupnorm.study.config import PRESETS, with_overrides
    from groupnorm.study.results import append_result
    from tests._gloo import free_port

    cfg = with_overrides(PRESETS["tiny"], train_workers=1)
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_json()))
    for spec in runner.plan_runs(cfg):
        record = {"key": spec.key, "spec": asdict(spec), "test_error": 1.0, "train_error": 1.0}
        append_result(out, record)
    before = (out / "results.jsonl").read_bytes()

    def no_data(*args: object) -> None:
        raise AssertionError("the data was loaded for a study with nothing left to run")

    for module in (runner, distributed):
        monkeypatch.setattr(module, "load_dataset", no_data)
    monkeypatch.setattr(runner, "fetch", no_data)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    assert distributed.run_distributed(cfg, out, device="cpu", progress=False) == 0
    assert (out / "results.jsonl").read_bytes() == before
    assert (out / "report.md").exists()
