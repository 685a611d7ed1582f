"""The study's report, rendered from ``results.jsonl`` alone: markdown tables and PNG plots.

- ``report.md``: test error (%) mean ± 95 % CI (Student's t over seeds) per arm and images per
  device N, the paper's ImageNet numbers beside it, train error, the group sweep, and the
  checks the issue asks the quick preset to pass, each with the numbers that decide it.
- ``batch_size.png``: error vs N (log-2 axis, N falling left to right as in the paper's figure 1),
  one line per norm with its CI band; test and train error side by side.
- ``groups.png``: error vs G and vs channels per group at N = 32.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupnorm.study.config import ARM_NAMES
from groupnorm.study.intervals import Summary, summarize
from groupnorm.study.results import read_results

__all__ = ["Check", "cells", "checks", "render_report"]

# Wu & He (2018), ResNet-50 on ImageNet, validation error (%), from SPEC.md.
PAPER_BATCH = {
    "BN": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "GN": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    "LN": {32: 25.3},
    "IN": {32: 28.4},
}
PAPER_GROUPS = {64: 24.6, 32: 24.1, 16: 24.6, 8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3}
PAPER_CPG = {64: 24.4, 32: 24.5, 16: 24.2, 8: 24.3, 4: 24.8, 2: 25.6, 1: 28.4}

ORDER = ("BN", "SyncBN", "BN (pop. stats)", "GN", "GN+WS", "LN", "IN")
COLOURS = {
    "BN": "tab:blue",
    "SyncBN": "tab:cyan",
    "BN (pop. stats)": "tab:olive",
    "GN": "tab:red",
    "GN+WS": "tab:orange",
    "LN": "tab:green",
    "IN": "tab:purple",
}


@dataclass(frozen=True)
class Cell:
    """All seeds of one arm at one N: ``test`` and ``train`` summaries."""

    arm: str  # "BN", "GN", "LN", "IN", "SyncBN"
    detail: str  # "G=8", "4 ch/group" or ""
    batch: int
    test: Summary
    train: Summary


def _arm(spec: dict[str, Any]) -> tuple[str, str]:
    name = ARM_NAMES[spec["norm"]]
    if spec.get("groups") is not None:
        return name, f"G={spec['groups']}"
    if spec.get("group_size") is not None:
        return name, f"{spec['group_size']} ch/group"
    return name, ""


def cells(records: Iterable[dict[str, Any]]) -> list[Cell]:
    """Group finished runs by (arm, detail, N) and summarize over seeds."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        arm, detail = _arm(r["spec"])
        groups[(arm, detail, int(r["spec"]["batch"]))].append(r)
    return [
        Cell(
            arm,
            detail,
            n,
            summarize([r["test_error"] for r in rs]),
            summarize([r["train_error"] for r in rs]),
        )
        for (arm, detail, n), rs in sorted(groups.items())
    ]


def _main_arms(all_cells: list[Cell], gn_groups: int | None) -> dict[str, dict[int, Cell]]:
    """arm -> N -> cell for the batch-size study (GN at its study G, not the sweep's)."""
    table: dict[str, dict[int, Cell]] = defaultdict(dict)
    for c in all_cells:
        if c.arm in ("GN", "GN+WS") and c.detail != f"G={gn_groups}":
            continue
        table[c.arm][c.batch] = c
    return {a: table[a] for a in ORDER if a in table}


@dataclass(frozen=True)
class Check:
    """One claim, whether the results support it, and the numbers that decide it."""

    claim: str
    passed: bool | None  # None: the results lack the cells (or seeds) to decide
    evidence: str


def checks(arms: dict[str, dict[int, Cell]]) -> list[Check]:
    """The issue's four claims for the batch-size study, decided from the cells."""
    out: list[Check] = []
    bn, gn = arms.get("BN", {}), arms.get("GN", {})
    claim = "BN's error at N=2 exceeds BN at N=32 by more than the two 95 % CI half-widths"
    if 2 in bn and 32 in bn and bn[2].test.n > 1 and bn[32].test.n > 1:
        gap = bn[2].test.mean - bn[32].test.mean
        need = bn[2].test.half_width + bn[32].test.half_width
        out.append(Check(claim, gap > need, f"gap {gap:.2f} vs half-widths {need:.2f}"))
    else:
        out.append(Check(claim, None, "needs BN at N=2 and N=32 with 2+ seeds"))
    claim = "GN's spread across N lies inside its 95 % CI (mean half-width over N)"
    if len(gn) > 1 and all(c.test.n > 1 for c in gn.values()):
        means = [c.test.mean for c in gn.values()]
        spread = max(means) - min(means)
        hw = sum(c.test.half_width for c in gn.values()) / len(gn)
        out.append(
            Check(
                claim,
                spread <= hw,
                f"spread {spread:.2f} vs half-width {hw:.2f} over N = {sorted(gn, reverse=True)}",
            )
        )
    else:
        out.append(Check(claim, None, "needs GN at 2+ batch sizes with 2+ seeds"))
    at32 = {a: cells_[32].test.mean for a, cells_ in arms.items() if 32 in cells_}
    claim = "IN is the worst norm at N=32"
    if "IN" in at32 and len(at32) > 1:
        others = {a: m for a, m in at32.items() if a != "IN"}
        out.append(
            Check(
                claim,
                all(at32["IN"] > m for m in others.values()),
                f"IN {at32['IN']:.2f} vs " + ", ".join(f"{a} {m:.2f}" for a, m in others.items()),
            )
        )
    else:
        out.append(Check(claim, None, "needs IN and another arm at N=32"))
    claim = "LN is worse than GN at N=32"
    if "LN" in at32 and "GN" in at32:
        out.append(
            Check(claim, at32["LN"] > at32["GN"], f"LN {at32['LN']:.2f} vs GN {at32['GN']:.2f}")
        )
    else:
        out.append(Check(claim, None, "needs LN and GN at N=32"))
    return out


def _batch_table(arms: dict[str, dict[int, Cell]], what: str, paper: bool) -> list[str]:
    batches = sorted({n for cs in arms.values() for n in cs}, reverse=True)
    head = "| arm | " + " | ".join(f"N={n}" for n in batches) + " |"
    lines = [head, "|---" * (len(batches) + 1) + "|"]
    for arm, cs in arms.items():
        row = [getattr(cs[n], what).fmt() if n in cs else "" for n in batches]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
        if paper and arm in PAPER_BATCH:
            ref = [f"{PAPER_BATCH[arm][n]:.1f}" if n in PAPER_BATCH[arm] else "" for n in batches]
            lines.append(f"| {arm}, paper | " + " | ".join(ref) + " |")
    return lines


def _sweep(all_cells: list[Cell], kind: str) -> dict[int, Cell]:
    """The GN sweep at N=32: G -> cell (kind "G") or channels per group -> cell ("cpg")."""
    out = {}
    for c in all_cells:
        if c.arm != "GN" or c.batch != 32:
            continue
        if kind == "G" and c.detail.startswith("G="):
            out[int(c.detail[2:])] = c
        if kind == "cpg" and c.detail.endswith("ch/group"):
            out[int(c.detail.split()[0])] = c
    return dict(sorted(out.items(), reverse=True))


def _sweep_table(sweep: dict[int, Cell], name: str, paper: dict[int, float]) -> list[str]:
    keys = list(sweep)
    lines = [
        f"| {name} | " + " | ".join(str(k) for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
        "| test error | " + " | ".join(sweep[k].test.fmt() for k in keys) + " |",
        "| train error | " + " | ".join(sweep[k].train.fmt() for k in keys) + " |",
        "| paper (ImageNet) | "
        + " | ".join(f"{paper[k]:.1f}" if k in paper else "" for k in keys)
        + " |",
    ]
    return lines


def _import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "the study's plots need matplotlib: pip install 'groupnorm[study]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_batch(arms: dict[str, dict[int, Cell]], path: Path, title: str) -> None:
    plt = _import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, what in zip(axes, ("test", "train"), strict=True):
        for arm, cs in arms.items():
            ns = sorted(cs, reverse=True)
            if not ns:
                continue
            m = [getattr(cs[n], what).mean for n in ns]
            hw = [getattr(cs[n], what).half_width for n in ns]
            hw = [0.0 if math.isnan(h) else h for h in hw]
            colour = COLOURS.get(arm)
            # Error bars too: an arm measured at one N has no band to show its interval.
            ax.errorbar(ns, m, yerr=hw, fmt="o-", color=colour, capsize=3, label=arm)
            ax.fill_between(
                ns,
                [a - b for a, b in zip(m, hw, strict=True)],
                [a + b for a, b in zip(m, hw, strict=True)],
                color=colour,
                alpha=0.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks([32, 16, 8, 4, 2], ["32", "16", "8", "4", "2"])
        ax.set_xlim(40, 1.6)  # falling N left to right, as in the paper's figure 1
        ax.set_xlabel("batch size (images per device)")
        ax.set_ylabel(f"{what} error (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("test error, mean and 95 % CI over seeds")
    axes[1].set_title("train error (last epochs, train mode)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_groups(g: dict[int, Cell], cpg: dict[int, Cell], path: Path, title: str) -> None:
    plt = _import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, name in ((axes[0], g, "groups G"), (axes[1], cpg, "channels per group")):
        if sweep:
            ks = list(sweep)
            ax.errorbar(
                ks,
                [sweep[k].test.mean for k in ks],
                yerr=[
                    0.0 if math.isnan(sweep[k].test.half_width) else sweep[k].test.half_width
                    for k in ks
                ],
                fmt="o-",
                color="tab:red",
                capsize=3,
                label="test",
            )
            ax.plot(ks, [sweep[k].train.mean for k in ks], "s--", color="tab:gray", label="train")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.invert_xaxis()
            ax.legend()
        ax.set_xlabel(name)
        ax.set_ylabel("error (%) at N=32")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(out: Path, *, plots: bool = True) -> str:
    """Write ``report.md`` (and the PNGs) into ``out`` from its results; return the markdown."""
    out = Path(out)
    records = read_results(out)
    if not records:
        raise ValueError(
            f"{out} holds no finished runs ({out / 'results.jsonl'} is missing or "
            f"empty): run `groupnorm study --out {out}` first"
        )
    config_path = out / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    gn_groups = config.get("gn_groups", 8)
    all_cells = cells(records)
    arms = _main_arms(all_cells, gn_groups)
    train = config.get("train", {})
    seeds = sorted({r["spec"]["seed"] for r in records})
    minutes = sum(r.get("seconds", 0.0) for r in records) / 60
    setup = (
        f"data `{config.get('data', '?')}` ({config.get('train_size', '?')} train / "
        f"{config.get('test_size', '?')} test images), ResNet width {train.get('width')} "
        f"x {train.get('blocks')} block(s) per stage, {train.get('epochs')} epochs, "
        f"{train.get('workers')} devices x N images per step, lr {train.get('lr')} x N/32, "
        f"GN with G={gn_groups}; seeds {seeds}; {len(records)} runs, "
        f"{minutes:.1f} run-minutes in total"
    )
    lines = [
        "# Batch-size study: GroupNorm vs BatchNorm",
        "",
        setup,
        "",
        "Test error (%), median of the last epochs, mean ± 95 % CI (Student's t over "
        "seeds); the paper's ResNet-50 ImageNet numbers (Wu & He 2018) beside each arm:",
        "",
    ]
    lines += _batch_table(arms, "test", paper=True)
    lines += ["", "Train error (%), same runs (the paper: GN optimizes better than BN):", ""]
    lines += _batch_table(arms, "train", paper=False)
    g, cpg = _sweep(all_cells, "G"), _sweep(all_cells, "cpg")
    if len(g) > 1 or cpg:
        lines += [
            "",
            "Group sweep at N=32 (GN; a G above a layer's channel count means G = C "
            "there, a group wider than the layer means one group):",
            "",
        ]
        if len(g) > 1:
            lines += _sweep_table(g, "G", PAPER_GROUPS) + [""]
        if cpg:
            lines += _sweep_table(cpg, "channels/group", PAPER_CPG)
    lines += ["", "## Checks", ""]
    for c in checks(arms):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c.passed]
        lines.append(f"- **{verdict}** {c.claim}: {c.evidence}")
    title = (
        f"{config.get('data', '?')}, ResNet width {train.get('width')}, "
        f"{train.get('epochs')} epochs, {train.get('workers')} devices x N, "
        f"{len(seeds)} seeds"
    )
    if plots:
        _plot_batch(arms, out / "batch_size.png", title)
        lines += ["", "![error vs batch size](batch_size.png)"]
        if len(g) > 1 or cpg:
            _plot_groups(g, cpg, out / "groups.png", title)
            lines += ["", "![error vs groups](groups.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
