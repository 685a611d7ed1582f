"""A performance MODEL (not a measurement) of the Triton GroupNorm kernels on docs/spec.md's shapes.

    python benchmarks/model.py [--device h100|h200] [--json PATH] [--compare BENCH.json]

For every spec shape, layout and direction it takes the launch plan the heuristics give on the
device (regime, grid, launches; groupnorm.triton.heuristics, pure Python), counts the DRAM bytes
those launches move with an L2 model, and turns them into a MODELED time and a MODELED % of the
copy floor. Nothing here runs on a GPU; its constants are fitted to H200 measurements
(assumptions 1 and 7). With --compare it puts the model beside a ``groupnorm bench`` JSON file
(its ``ours`` rows beside the auto plan's, its ``ours-wave`` rows beside the wave regime's) and
flags disagreements over 20 %. Against the first H200 bench (84 rows): 14 flagged, 7 of the
42 NCHW rows fitted and 7 of the 42 channels-last rows predicted, median |diff| 12 and 11 % (28
flagged, 15 %, with one launch cost and ETA fitted to the H100 prototype). Still off: on-chip
forwards of small shapes (channels-last ones 1-3 us slower than NCHW ones, not modeled), SD's
channels-last 30-channel groups, R50-GN C5's backward (odd spatial size), float32's fused
regime (over-predicted: more L2 hits than assumption 2 gives).

Assumptions (each a number below, each the first suspect when a measurement disagrees):

1. Time of one timed call (a forward, or a forward and backward replayed as one CUDA graph)
   = call_us + launches x launch_us + DRAM bytes / (eta x copy rate), eta_fwd for forward
   launches and eta_bwd for backward ones, with the bandwidth capped by the bytes a launch keeps
   in flight (Little's law: in-flight bytes / DRAM_LATENCY_US). These four (Fit) are FITTED on
   the H200 (least squares in relative error, fit_constants) to the NCHW rows of FIT_FILE; its
   channels-last rows and docs/spec.md's H100 prototype timings are predictions (the
   calibration table prints both). launch_us stands for what a launch costs beyond moving bytes
   (launch gap, ramp-up, tail); call_us for what a timed call costs once (graph launch, events).
2. Issued reads come from heuristics.PASSES (the traffic tests assert them under the
   interpreter). A second read of a byte hits L2 with probability min(1, L2_EFFECTIVE / reuse
   distance): the bytes the device touches between the two reads. Reuse distance: fused regime,
   the groups of all resident programs (x 1.5 for the y/dx writes of programs already in their
   second phase); split regime, the whole tensor (the first kernel reads all of it before the
   second starts); on-chip, none (no second read).
3. Resident programs per SM: the smallest of 2048 threads, 65536 registers and 32 programs; the
   registers per thread are estimated from the sm_90 sweep in heuristics.py (REGS_* below).
4. In flight per program: the on-chip regime issues its whole tile before reducing (one tile of
   bytes); the loop-based kernels keep about one tile of heuristics.TILE elements in flight.
5. Small per-(n, c) or per-(n, g) traffic (statistics, channel sums, parameters) is ignored.
6. The wave regime (opt-in: ``auto`` never takes it; it measured slower on an H200) is one launch
   of its persistent grid (backward: plus the parameter kernel); its second reads have a reuse
   distance of heuristics.WAVE_STACK waves (five forward, eight backward: the bound its traffic
   test asserts), at most the bytes the launch issues. A normalize ticket waits for its wave's
   last partials unless a wave has at least as many tickets as there are programs: the
   bandwidth is scaled by min(1, tickets per wave / programs). Its rows are printed beside the
   ``auto`` plan's, marked "wave".
7. Channels-last loop launches stream at CL_EFFICIENCY of the NCHW rate, times the share of a
   run's channel block its channels fill; on-chip launches stream as NCHW ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from groupnorm.bench import SHAPES, Shape, bytes_moved
from groupnorm.triton import heuristics as h

# ---------------------------------------------------------------------------- the assumptions

DEVICES = {
    # docs/spec.md: copy rate (read + write), SMs, L2. L2_EFFECTIVE: what a schedule may count on
    # (about half of L2: set-associativity, other traffic, write-back).
    "h100": dict(copy_bw=3.0e12, sms=132, l2=50e6, l2_effective=25e6),
    "h200": dict(copy_bw=4.3e12, sms=132, l2=60e6, l2_effective=30e6),
}
DRAM_LATENCY_US = 0.8  # loaded-latency of HBM3 as seen by an SM (not fitted)
REGS_PER_SLOT_THREAD = 1.25  # registers ~ 48 + 1.25 x tile slots per thread (sweep, loosely)
REGS_BASE = 48
LOOP_KERNEL_REGS = 64  # the loop-based kernels at 4 warps (compiled: 32-55 NCHW)
# Channels-last loop launches (fused, split, wave) stream below NCHW's rate: at each position a
# program reads one run of channels (64-128 bytes), where an NCHW program reads long rows.
# FITTED on ONE measurement, H200 bf16 VAE 1024^2 forward, channels-last 352 us against NCHW 256
# us (benchmarks/results/bench-nvidia-h200-20261204T131010Z.json); every other channels-last
# row is a prediction. A run narrower than its power-of-two channel block (SD's 40 channels in
# 64 lanes) loses the masked lanes' share on top.
CL_EFFICIENCY = 0.73
# The H200 bench whose NCHW rows the constants of assumption 1 are fitted to (fit_constants).
FIT_FILE = Path(__file__).parent / "results" / "bench-nvidia-h200-20261204T131010Z.json"

# docs/spec.md: H100, bf16, forward, the plain two-kernel split prototype, median microseconds.
PROTOTYPE = [
    (Shape("VAE 1x128x512^2", 1, 128, (512, 512)), 88.0),
    (Shape("FPN 2x256x200x304", 2, 256, (200, 304)), 83.0),
    (Shape("3-D 2x32x128^3", 2, 32, (128, 128, 128), G=8), 295.0),
    (Shape("ResNet 32x256x56^2", 32, 256, (56, 56)), 72.0),
    (Shape("SD 2x320x64^2", 2, 320, (64, 64)), 13.0),
]
# docs/spec.md, H100 bf16 forward: cuDNN BatchNorm (NHWC) and torch.compile (NCHW), microseconds.
BASELINES = {
    (2, 320, (64, 64)): {"cudnn_bn": 27.0, "torch_compile": 63.0},
    (1, 128, (512, 512)): {"cudnn_bn": 197.0, "torch_compile": 355.0},
    (2, 256, (200, 304)): {"cudnn_bn": 166.0},
    (32, 256, (56, 56)): {"cudnn_bn": 143.0, "torch_compile": 283.0},
    (2, 32, (128, 128, 128)): {"cudnn_bn": 1793.0},
}


# ----------------------------------------------------------------------------------- the model


@dataclass
class Launch:
    """One kernel launch as the model sees it."""

    kernel: str
    programs: int
    warps: int
    slots: int  # tile elements per program in flight
    issued: float  # bytes issued to memory (reads + writes)
    second_reads: float  # bytes of those that re-read data read earlier in this call
    reuse_bytes: float  # bytes touched between a byte's two reads
    wave_tickets: int = 0  # wave regime: tickets per wave (S or N half)
    efficiency: float = 1.0  # of the streaming rate: channels-last loop launches, CL_EFFICIENCY
    backward: bool = False  # streams at the backward ETA
    esize: int = 2  # bytes per element in flight


@dataclass
class Row:
    forward: str  # the regime asked for: "auto", or "wave" (opt-in, both directions)
    workload: str
    shape: str
    layout: str
    direction: str
    regime: str
    grid: int
    launches: int
    dram_passes: float  # modeled DRAM bytes / bytes of x
    reuse_mb: float
    model_us: float
    floor_us: float
    model_pct_floor: float


def _resident(warps: int, slots: int) -> int:
    threads = 32 * warps
    regs = min(255, REGS_BASE + REGS_PER_SLOT_THREAD * slots / threads)
    return max(1, min(2048 // threads, int(65536 // (regs * threads)), 32))


def _loop_resident(warps: int) -> int:
    return max(1, min(2048 // (32 * warps), 65536 // (LOOP_KERNEL_REGS * 32 * warps), 32))


def plan(
    shape: Shape, layout: str, direction: str, sms: int, regime: str = "auto"
) -> tuple[str, list[Launch]]:
    """The launches one call makes ("fwd" or "bwd"), from the heuristics (as on the device)."""
    N, C, G = shape.N, shape.C, shape.G
    L = shape.numel // (N * C)
    esize = shape.nbytes // shape.numel
    cg = C // G
    cfg = h.choose_config(
        N, L, cg, G, layout == "channels_last", sms, regime, even=C % G == 0, elem_bytes=esize,
        direction=direction,
    )  # fmt: skip
    x = float(shape.nbytes)
    group = x / (N * G)
    slots = cfg.block_c * cfg.block_l
    reads = 1 if direction == "fwd" else 2  # x (and dy) per pass
    if cfg.regime == "onchip":
        programs = N * -(-G // cfg.groups_per_program)
        launches = [Launch("onchip", programs, cfg.num_warps, slots, (reads + 1) * x, 0.0, 0.0)]
    elif cfg.regime == "wave":
        issued = (2 * reads + 1) * x
        reuse = min(h.WAVE_STACK[direction] * cfg.wave_rows * group, issued)
        launch = Launch("wave", cfg.programs, cfg.num_warps, slots, issued, reads * x, reuse)
        launch.wave_tickets = cfg.wave_rows * cfg.chunks
        launches = [launch]
    else:
        # a program spans groups_per_program groups (channels-last runs, heuristics.loop_run)
        programs = N * (G // cfg.groups_per_program) * cfg.chunks
        resident = min(programs, sms * _loop_resident(4))
        if cfg.regime == "fused":
            reuse = resident * group * cfg.groups_per_program * reads * 1.5
            launches = [Launch("fused", programs, 4, slots, (2 * reads + 1) * x, reads * x, reuse)]
        else:
            launches = [
                Launch("partial", programs, 4, slots, reads * x, 0.0, 0.0),
                Launch("normalize", programs, 4, slots, (reads + 1) * x, reads * x, reads * x),
            ]
    if layout == "channels_last" and cfg.regime != "onchip":
        run = cfg.groups_per_program * cg
        for launch in launches:
            launch.efficiency = CL_EFFICIENCY * run / max(run, cfg.block_c)
    if direction == "bwd":
        launches.append(Launch("param", -(-C // 1024), 4, 1024, 0.0, 0.0, 0.0))
        for launch in launches:
            launch.backward = True
    for launch in launches:
        launch.esize = esize
    return cfg.regime, launches


class Fit(NamedTuple):
    """The constants of assumption 1."""

    call_us: float
    launch_us: float
    eta_fwd: float
    eta_bwd: float


def launch_time_us(launch: Launch, dev: dict, fit: Fit) -> tuple[float, float]:
    """(modeled microseconds, modeled DRAM bytes) of one launch."""
    hit = 0.0
    if launch.second_reads:
        hit = min(1.0, dev["l2_effective"] / max(launch.reuse_bytes, 1.0))
    dram = launch.issued - hit * launch.second_reads
    if launch.kernel == "onchip":
        per_sm = _resident(launch.warps, launch.slots)
    else:
        per_sm = _loop_resident(launch.warps)
    active = min(launch.programs, dev["sms"] * per_sm)
    inflight = active * launch.slots * launch.esize
    eta = fit.eta_bwd if launch.backward else fit.eta_fwd
    bw = min(eta * launch.efficiency * dev["copy_bw"], inflight / (DRAM_LATENCY_US * 1e-6))
    if launch.wave_tickets:
        bw *= min(1.0, launch.wave_tickets / active)
    return fit.launch_us + 1e6 * dram / bw, dram


def call_plan(
    shape: Shape, layout: str, direction: str, sms: int, regime: str = "auto"
) -> tuple[list[str], list[Launch]]:
    """The regimes and launches of one timed call ("fwd" or "fwd+bwd")."""
    regimes, launches = [], []
    for part in ["fwd"] if direction == "fwd" else ["fwd", "bwd"]:
        name, ls = plan(shape, layout, part, sms, regime)
        regimes.append(name)
        launches += ls
    return regimes, launches


# groupnorm bench's providers of our kernels -> the regime of the model's rows they measure.
REGIMES = {"ours": "auto", "ours-wave": "wave"}


def measured_us(path: Path, provider: str = "ours") -> dict[tuple[str, str, str], float]:
    """(workload, layout, direction) -> median microseconds of ``provider`` in a bench JSON
    file."""
    return {
        (r["workload"], r["layout"], r["direction"]): r["median_us"]
        for r in json.loads(path.read_text())["rows"]
        if r.get("provider") == provider and "median_us" in r
    }


def fit_constants() -> Fit:
    """Assumption 1's constants, least squares in relative error over FIT_FILE's NCHW rows (the
    auto plan, H200): for each (eta_fwd, eta_bwd) on a grid of 0.01 steps from 0.30 to 1.00,
    call_us and launch_us in closed form (each equation divided by its measurement, so that a
    6 us row counts as much as a 600 us one); the pair with the smallest squared error."""
    dev = DEVICES["h200"]
    measured = measured_us(FIT_FILE)
    cases = []
    for shape in SHAPES:
        for direction in ("fwd", "fwd+bwd"):
            key = (shape.workload, "nchw", direction)
            if key in measured:
                cases.append((call_plan(shape, "nchw", direction, dev["sms"])[1], measured[key]))
    grid = [i / 100 for i in range(30, 101)]
    best: tuple[float, Fit] | None = None
    for eta_fwd in grid:
        for eta_bwd in grid:
            streaming = Fit(0.0, 0.0, eta_fwd, eta_bwd)
            rows = [
                (len(ls), sum(launch_time_us(launch, dev, streaming)[0] for launch in ls), m)
                for ls, m in cases
            ]
            # m = call + n launch + t: scaled rows (1 / m, n / m) . (call, launch) = (m - t) / m
            scaled = [(1.0 / m, n / m, (m - t) / m) for n, t, m in rows]
            s11 = sum(r[0] * r[0] for r in scaled)
            s12 = sum(r[0] * r[1] for r in scaled)
            s22 = sum(r[1] * r[1] for r in scaled)
            t1 = sum(r[0] * r[2] for r in scaled)
            t2 = sum(r[1] * r[2] for r in scaled)
            det = s11 * s22 - s12 * s12
            call_us = (t1 * s22 - t2 * s12) / det
            launch_us = (s11 * t2 - s12 * t1) / det
            err = sum(((call_us + n * launch_us + t - m) / m) ** 2 for n, t, m in rows)
            if best is None or err < best[0]:
                best = (err, Fit(call_us, launch_us, eta_fwd, eta_bwd))
    assert best is not None
    return best[1]


def prototype_check(fit: Fit) -> list[tuple[str, float, float]]:
    """(shape, measured, modeled) of docs/spec.md's H100 two-kernel split prototype: two forward
    launches, x read twice with the L2 model above. A prediction: nothing was fitted to it."""
    dev = DEVICES["h100"]
    table = []
    for shape, measured in PROTOTYPE:
        x = float(shape.nbytes)
        dram = 3 * x - min(1.0, dev["l2_effective"] / x) * x
        modeled = fit.call_us + 2 * fit.launch_us + 1e6 * dram / (fit.eta_fwd * dev["copy_bw"])
        table.append((shape.label, measured, modeled))
    return table


def model(device: str, fit: Fit) -> list[Row]:
    """Rows of the ``auto`` plan for every shape, layout and direction; where its forward is
    not on chip, also rows of the wave regime (forward and backward)."""
    dev = DEVICES[device]
    rows = []
    for shape in SHAPES:
        for layout in ("nchw", "channels_last"):
            forwards = ["auto"]
            if plan(shape, layout, "fwd", dev["sms"])[0] != "onchip":
                forwards.append("wave")
            for forward, direction in ((f, d) for f in forwards for d in ("fwd", "fwd+bwd")):
                regimes, launches = call_plan(shape, layout, direction, dev["sms"], forward)
                times = [launch_time_us(launch, dev, fit) for launch in launches]
                total_us = fit.call_us + sum(t for t, _ in times)
                floor_us = 1e6 * bytes_moved(shape, direction) / dev["copy_bw"]
                rows.append(
                    Row(
                        forward,
                        shape.workload,
                        shape.label,
                        layout,
                        direction,
                        "+".join(regimes),
                        launches[0].programs,
                        len(launches),
                        sum(d for _, d in times) / shape.nbytes,
                        max(launch.reuse_bytes for launch in launches) / 1e6,
                        total_us,
                        floor_us,
                        100 * floor_us / total_us,
                    )
                )
    return rows


# --------------------------------------------------------------------------------- reporting


def _targets(rows: list[Row], device: str) -> list[str]:
    """The issue's modeled targets, each line MET or NOT MET (all modeled)."""
    out = []
    big = {s.workload for s in SHAPES if s.nbytes >= 8e6}
    small = {s.workload for s in SHAPES if s.nbytes < 2**20}
    for direction, goal in (("fwd", 85.0), ("fwd+bwd", 75.0)):
        bad = [
            f"{r.workload} {r.layout} {r.model_pct_floor:.0f}%"
            for r in rows
            if r.workload in big and r.direction == direction and r.model_pct_floor < goal
        ]
        verdict = "MET" if not bad else "NOT MET: " + "; ".join(bad)
        out.append(f"modeled >= {goal:.0f}% of floor, {direction}, shapes >= 8 MB: {verdict}")
    bad = [
        f"{r.workload} {r.layout} {r.direction} {r.launches}"
        for r in rows
        if r.workload in small
        and (
            (r.direction == "fwd" and r.launches > 1)
            or (r.direction == "fwd+bwd" and r.launches > 3)
        )
    ]
    out.append(
        "one launch forward, at most two backward, shapes < 1 MiB: "
        + ("MET" if not bad else "NOT MET: " + "; ".join(bad))
    )
    if device == "h100":
        for shape in SHAPES:
            base = BASELINES.get((shape.N, shape.C, shape.spatial))
            if base is None or shape.dtype != torch.bfloat16:
                continue
            for r in rows:
                if r.shape == shape.label and r.direction == "fwd":
                    for name, us in base.items():
                        verdict = "faster" if r.model_us < us else "NOT faster"
                        out.append(
                            f"{shape.workload} {r.layout}: modeled {r.model_us:.1f} us vs "
                            f"measured {name} {us:.0f} us: {verdict}"
                        )
    return out


def _with_wave(rows: list[Row]) -> list[Row]:
    """One row per (shape, layout, direction): the wave regime's where there is one."""
    best = {(r.workload, r.layout, r.direction): r for r in rows if r.forward == "auto"}
    best.update({(r.workload, r.layout, r.direction): r for r in rows if r.forward == "wave"})
    return list(best.values())


def _compare(rows: list[Row], path: Path, device: str) -> None:
    """The model beside each of our providers the file times: ``ours`` against the auto plan's
    rows, ``ours-wave`` against the wave regime's (a bench run with only the wave provider
    holds no ``ours`` rows)."""
    meta = json.loads(path.read_text()).get("meta", {})
    measured_on = str(meta.get("device", "")) if isinstance(meta, dict) else ""
    if measured_on and device.upper() not in measured_on.upper():
        print(f"\nnote: {path.name} was measured on {measured_on}, the model is of {device}")
    fitted = path.resolve() == FIT_FILE.resolve()
    for provider, regime in REGIMES.items():
        measured = measured_us(path, provider)
        if not measured:
            continue
        print(f"\nMODEL ({regime}) vs MEASURED ({path.name}; {provider}; |diff| > 20 % flagged)")
        diffs: dict[str, list[float]] = {"nchw": [], "channels_last": []}
        for r in rows:
            m = measured.get((r.workload, r.layout, r.direction))
            if r.forward != regime or m is None:
                continue
            diff = (m - r.model_us) / r.model_us
            diffs[r.layout].append(abs(diff))
            flag = "  <-- model off by > 20 %" if abs(diff) > 0.2 else ""
            print(
                f"{r.workload:<30} {r.layout:<13} {r.direction:<8} model {r.model_us:8.1f} us  "
                f"measured {m:8.1f} us  ({100 * diff:+.0f} %){flag}"
            )
        if not any(diffs.values()):
            print(f"none of its {len(measured)} rows is a shape the model has {regime} rows for")
        for layout, ds in diffs.items():
            if ds:
                fit_rows = fitted and regime == "auto" and layout == "nchw"
                print(
                    f"{layout} ({'fitted to' if fit_rows else 'predicted'}): "
                    f"{sum(d > 0.2 for d in ds)} of {len(ds)} rows off by > 20 %,"
                    f" median |diff| {100 * statistics.median(ds):.0f} %"
                )


def _bench_file(text: str) -> Path:
    """--compare, read at parsing: a missing or foreign file gave a traceback (after the
    model's tables, for a missing one)."""
    path = Path(text)
    try:
        timed = any(measured_us(path, provider) for provider in REGIMES)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not bench's
        timed = False
    if not timed:
        raise argparse.ArgumentTypeError(
            f"{text} holds no timed rows of ours (providers {', '.join(REGIMES)}), so nothing "
            "to compare: give a results file of `groupnorm bench` that ran them "
            "(benchmarks/results/bench-*.json)"
        )
    return path


def _json_out(text: str) -> Path:
    """--json, checked at parsing: its folder must exist and take a file."""
    folder = Path(text).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a writable folder")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a folder: give a file name, e.g. {text}/model.json"
        )
    return Path(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--json", type=_json_out, help="also write the modeled rows here")
    parser.add_argument("--compare", type=_bench_file, help="a groupnorm bench JSON to set beside")
    args = parser.parse_args()
    fit = fit_constants()
    print(f"PERFORMANCE MODEL (no GPU ran this); constants fitted on {FIT_FILE.name} (NCHW rows):")
    print(
        f"  per call {fit.call_us:.2f} us, per launch {fit.launch_us:.2f} us, streaming at "
        f"{fit.eta_fwd:.2f} (forward) and {fit.eta_bwd:.2f} (backward) of the copy rate"
    )
    print("predicted, docs/spec.md's H100 two-kernel split prototype:")
    for label, measured, modeled in prototype_check(fit):
        print(f"  {label:<26} measured {measured:6.1f} us  model {modeled:6.1f} us")
    rows = model(args.device, fit)
    print(
        f"\nMODEL, {args.device.upper()}: {'workload':<30} {'layout':<13} {'dir':<8} "
        f"{'regime':<14} {'grid':>6} {'launch':>6} {'passes':>6} {'reuse MB':>8} "
        f"{'model us':>9} {'floor us':>8} {'% floor':>7}"
    )
    for r in rows:
        print(
            f"{'':<13} {r.workload:<30} {r.layout:<13} {r.direction:<8} {r.regime:<14} "
            f"{r.grid:>6} {r.launches:>6} {r.dram_passes:>6.2f} {r.reuse_mb:>8.1f} "
            f"{r.model_us:>9.1f} {r.floor_us:>8.1f} {r.model_pct_floor:>6.0f}%"
        )
    print("\nTargets (MODELED), the auto plan:")
    for line in _targets([r for r in rows if r.forward == "auto"], args.device):
        print("  " + line)
    print("\nTargets (MODELED), the wave regime where auto's forward is not on chip:")
    for line in _targets(_with_wave(rows), args.device):
        print("  " + line)
    if args.json:
        meta = {"kind": "performance MODEL, not a measurement", "device": args.device}
        meta.update(fit._asdict())
        args.json.write_text(
            json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
        )
    if args.compare:
        _compare(rows, args.compare, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
