"""Command line: ``groupnorm demo | check | study | bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import groupnorm
from groupnorm import bench
from groupnorm import reference as ref
from groupnorm.backends import cpu_kernel
from groupnorm.dispatch import BackendRefused
from groupnorm.study import cli as study_cli

# The seed article's worked example (N=1, C=8, no spatial extent, G=2) and the digits it prints.
ARTICLE_X = [1.2, 0.4, -0.8, 2.1, 0.9, -0.3, 1.5, -1.1]
ARTICLE_Y = [0.4455, -0.3049, -1.4302, 1.2895, 0.6413, -0.5426, 1.233, -1.3317]
ARTICLE_MEAN = [0.725, 0.25]
ARTICLE_VAR = [1.1369, 1.0275]


def _fmt(values: Sequence[float], digits: int = 8) -> str:
    return "[" + ", ".join(f"{v: .{digits}f}" for v in values) + "]"


def demo() -> int:
    """The article's worked example, the G=1 / G=C identities, and uneven groups."""
    x = torch.tensor([ARTICLE_X], dtype=torch.float64)
    y, stats = groupnorm.group_norm(x, 2, return_stats=True)
    y_ref, cache = ref.group_norm_forward(x.numpy(), 2)
    print("== The article's worked example: x (N=1, C=8), G=2, gamma=1, beta=0, eps=1e-5")
    print(f"group means      library {_fmt(stats.mean[0].tolist())}   article {ARTICLE_MEAN}")
    print(f"group variances  library {_fmt(stats.var[0].tolist())}   article {ARTICLE_VAR}")
    print(f"{'c':>3} {'x':>6} {'library y':>12} {'float64 ref':>12} {'article':>8} {'diff':>9}")
    rows = zip(ARTICLE_X, y[0].tolist(), y_ref[0], ARTICLE_Y, strict=True)
    for c, (xi, yi, ri, ai) in enumerate(rows):
        print(f"{c:>3} {xi:>6.1f} {yi:>12.8f} {ri:>12.8f} {ai:>8.4f} {yi - ai:>9.1e}")
    worst = float(np.max(np.abs(y[0].numpy() - np.array(ARTICLE_Y))))
    print(
        f"The article's printed digits come from its hand calculation with a rounded sigma; "
        f"they differ from the exact values by up to {worst:.1e}. The library matches the "
        f"float64 reference to {float(np.max(np.abs(y.numpy() - y_ref))):.0e}."
    )

    print("\n== G = 1 is LayerNorm over (C, *spatial); G = C is InstanceNorm")
    xs = torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ln = torch.nn.functional.layer_norm(xs, xs.shape[1:])
    inorm = torch.nn.functional.instance_norm(xs)
    d1 = (groupnorm.group_norm(xs, 1) - ln).abs().max().item()
    dc = (groupnorm.group_norm(xs, 6) - inorm).abs().max().item()
    print(
        f"x of shape {tuple(xs.shape)}: |GN(G=1) - LayerNorm| = {d1:.1e}, "
        f"|GN(G=C) - InstanceNorm| = {dc:.1e}"
    )
    y1 = groupnorm.group_norm(x, 1)
    _, mean1, var1 = ref.layer_norm(x.numpy())
    print(
        f"on the article's x, G=1: {_fmt(y1[0].tolist(), 4)}  (mean {mean1.item():.4f}, "
        f"var {var1.item():.8f})"
    )

    print("\n== A group of one element (G = C = 8, no spatial extent)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y8 = groupnorm.group_norm(x, 8, bias=torch.full((8,), 0.5, dtype=torch.float64))
    for w in caught:
        print(f"warning: {w.message}")
    print(f"output with beta = 0.5: {_fmt(y8[0].tolist(), 4)}")

    print("\n== Uneven channel counts: C = 48 with G = 32")
    x48 = torch.randn(1, 48, 4, 4, generator=torch.Generator().manual_seed(1))
    try:
        groupnorm.group_norm(x48, 32)
    except ValueError as e:
        print(f"group_norm(x, 32) -> ValueError: {e}")
    variants: list[tuple[str, dict[str, Any]]] = [
        ("uneven=True", {"num_groups": 32, "uneven": True}),
        ("group_size=16", {"group_size": 16}),
    ]
    for label, kwargs in variants:
        plan = groupnorm.make_plan(48, **kwargs)
        out = groupnorm.group_norm(x48, **kwargs)
        print(f"{label:>14}: {plan.describe()}; output std {out.std().item():.4f}")
    choice = groupnorm.choose_num_groups(48)
    print(f"choose_num_groups(48) -> {choice.num_groups} ({choice.reason})")
    return 0


# The tolerance table of tests/_tolerances.py (docs/spec.md, "The tolerance rule"), which src
# cannot import; tests/test_cli.py checks that the two agree.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6}

# (case, dtype, shape, group_norm keywords): quick calls that every available backend runs.
SELF_TEST_CASES: list[tuple[str, torch.dtype, tuple[int, ...], dict[str, Any]]] = [
    ("fp32 NCHW G=4", torch.float32, (2, 8, 5, 5), {"num_groups": 4}),
    (
        "fp32 channels-last uneven G=3",
        torch.float32,
        (2, 8, 4, 4),
        {"num_groups": 3, "uneven": True},
    ),
    ("bf16 silu group_size=2", torch.bfloat16, (2, 8, 6), {"group_size": 2, "activation": "silu"}),
]


def _allowed(expected: np.ndarray, dtype: torch.dtype, truncates_bf16: bool) -> np.ndarray:
    """The error the tolerance table allows each element of an output (no reduction to scale for).

    Half precision is judged against ``expected`` rounded to the dtype (torch has no fused
    epilogue to be the baseline); Triton's interpreter stores bfloat16 by dropping the low 16
    bits, so there the baseline is ``expected`` rounded toward zero.
    """
    if dtype in RTOL:
        return ATOL[dtype] + RTOL[dtype] * np.abs(expected)
    f32 = torch.from_numpy(expected).float()
    if truncates_bf16 and dtype == torch.bfloat16:
        rounded = (f32.view(torch.int32) & -65536).view(torch.float32).double().numpy()
    else:
        rounded = f32.to(dtype).double().numpy()
    return 2 * np.abs(rounded - expected) + ATOL[dtype]


def _self_test() -> tuple[list[tuple[str, str, float, float]], list[str], list[str]]:
    """Every available backend, on each device here, against the float64 reference.

    Returns ``rows``: (backend/device, case, max abs error, worst error / allowed), NaN when the
    output has a NaN the reference does not; ``notes``: what was not checked and why;
    ``failures``: a backend listed as available that served none of the calls, or a case that
    raised on a device its backend served.
    """
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for name, dtype, shape, kw in SELF_TEST_CASES:
        x = torch.randn(shape, generator=gen).to(dtype)
        plan_kw = {k: v for k, v in kw.items() if k != "activation"}
        expected, _ = ref.group_norm_forward(
            x.double().numpy(), **plan_kw, activation=kw.get("activation")
        )
        inputs.append((name, dtype, x, kw, expected))
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    rows: list[tuple[str, str, float, float]] = []
    notes: list[str] = []
    failures: list[str] = []
    for backend, reason in groupnorm.available_backends().items():
        if reason is not None:
            notes.append(f"{backend}: not checked, unavailable here: {reason}")
            continue
        ran = 0
        for device in devices:
            where = f"{backend}/{device}"
            for i, (name, dtype, x, kw, expected) in enumerate(inputs):
                xd = x.to(device)
                if "channels-last" in name:
                    xd = xd.to(memory_format=torch.channels_last)
                try:
                    y = groupnorm.group_norm(xd, **kw, backend=backend)
                except BackendRefused as e:
                    if i == 0:  # the backend does not serve this device
                        notes.append(f"{where}: not checked ({e})")
                        break
                    notes.append(f"{where} {name}: not checked ({e})")
                    continue
                except Exception as e:  # a served call that fails is a failure, not a crash
                    failures.append(f"{where} {name}: {type(e).__name__}: {e}")
                    continue
                ran += 1
                err = np.abs(y.double().cpu().numpy() - expected)
                truncates = backend == "triton" and interpreting
                fraction = np.max(err / _allowed(expected, dtype, truncates))
                rows.append((where, name, float(np.max(err)), float(fraction)))
        if not ran:
            failures.append(f"{backend}: listed as available but served none of the calls")
    return rows, notes, failures


def check() -> int:
    """Versions, backends on this machine, and a quick self-test against the reference."""
    print(
        f"groupnorm {groupnorm.__version__}  python {platform.python_version()}  "
        f"torch {torch.__version__}  numpy {np.__version__}"
    )
    print(f"cuda available: {torch.cuda.is_available()}")
    print("backends:")
    for name, reason in groupnorm.available_backends().items():
        print(f"  {name:<8} {'available' if reason is None else 'unavailable: ' + reason}")
    print(
        "mask= and process_group= run the torch backend's composite ops on every device "
        "(the triton backend defers them to it)"
    )
    print(f"CPU: {cpu_kernel.status()}")
    rows, notes, failures = _self_test()
    print(
        "self-test against the float64 reference, judged by the tolerance table "
        "(docs/spec.md; fraction: the worst element's error / allowed):"
    )
    failed = len(failures)
    for where, name, err, fraction in rows:
        ok = fraction <= 1  # False for NaN: a NaN fails the check, it cannot pass it
        failed += not ok
        print(
            f"  {'ok  ' if ok else 'FAIL'} {where:<12} {name:<30} max abs err {err:.2e} "
            f"(fraction {fraction:.2f})"
        )
    for note in notes:
        print(f"  {note}")
    for failure in failures:
        print(f"  FAIL {failure}")
    return 1 if failed else 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


# name -> (help, add its arguments to a subparser, run it with the parsed arguments).
# A subcommand with its own options lives in its own module and is listed here.
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "demo": (
        "the article's worked example, G=1/G=C identities, uneven groups",
        _no_arguments,
        lambda args: demo(),
    ),
    "check": (
        "versions, available backends, a quick self-test",
        _no_arguments,
        lambda args: check(),
    ),
    "study": (
        "the batch-size study: BN vs GN/LN/IN over images per device, with CIs and plots",
        study_cli.add_arguments,
        study_cli.run,
    ),
    "bench": (
        "GPU speed vs torch, torch.compile, cuDNN BatchNorm and the bandwidth floor",
        bench.add_arguments,
        bench.main,
    ),
}


# What a shell reports for a program that SIGPIPE ended (128 + 13), as `yes | head -1` does.
SIGPIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="groupnorm", description="Group Normalization toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        status = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a reader gone while the output sat in the buffer shows here
    except BrokenPipeError:
        # The reader stopped reading (`groupnorm demo | head -1`): end quietly, as a program
        # killed by SIGPIPE does, not with a traceback. stdout goes to devnull so that
        # Python's own flush at exit does not fail on the broken pipe again (the Python docs'
        # "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS
    return status


if __name__ == "__main__":
    sys.exit(main())
