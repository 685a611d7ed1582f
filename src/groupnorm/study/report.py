"""The study's report, rendered from ``results.jsonl`` alone: markdown tables and PNG plots.

- ``report.md``: test error (%) mean ± 95 % CI (Student's t over seeds) per arm and images per
  device N, the paper's ImageNet numbers beside it, train error (eval mode), the group sweep,
  the pre-registered claims (:mod:`groupnorm.study.protocol`) each with its test statistic,
  interval and verdict, the control arms, and which seeds were used for what.
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

from groupnorm.study.config import ARM_NAMES, POP_ARM, TUNING_SEEDS
from groupnorm.study.intervals import Summary, paired, summarize
from groupnorm.study.protocol import MARGIN, cell_errors, decide, gn_setting
from groupnorm.study.results import read_results

__all__ = ["cells", "render_report"]

# Wu & He (2018), ResNet-50 on ImageNet, validation error (%): docs/spec.md#the-papers-numbers.
PAPER_BATCH = {
    "BN": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "GN": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    "LN": {32: 25.3},
    "IN": {32: 28.4},
}
PAPER_GROUPS = {64: 24.6, 32: 24.1, 16: 24.6, 8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3}
PAPER_CPG = {64: 24.4, 32: 24.5, 16: 24.2, 8: 24.3, 4: 24.8, 2: 25.6, 1: 28.4}

ORDER = ("BN", "SyncBN", POP_ARM, "GN", "GN+WS", "LN", "IN")
COLOURS = {
    "BN": "tab:blue",
    "SyncBN": "tab:cyan",
    POP_ARM: "tab:olive",
    "GN": "tab:red",
    "GN+WS": "tab:orange",
    "LN": "tab:green",
    "IN": "tab:purple",
}


@dataclass(frozen=True)
class Cell:
    """All seeds of one arm at one N: ``test`` and ``train`` summaries (``train`` is None for
    the population-statistics evaluation of BN runs, which measures test error only)."""

    arm: str  # "BN", "GN", "LN", "IN", "SyncBN", POP_ARM
    detail: str  # "G=8", "4 ch/group" or ""
    batch: int
    test: Summary
    train: Summary | None


def _arm(spec: dict[str, Any]) -> tuple[str, str]:
    name = ARM_NAMES[spec["norm"]]
    if spec.get("groups") is not None:
        return name, f"G={spec['groups']}"
    if spec.get("group_size") is not None:
        return name, f"{spec['group_size']} ch/group"
    return name, ""


def cells(records: Iterable[dict[str, Any]]) -> list[Cell]:
    """Group finished runs by (arm, detail, N) and summarize over seeds; BN runs evaluated
    with population statistics also make the cells of that arm."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    pop: dict[int, list[float]] = defaultdict(list)
    for r in records:
        arm, detail = _arm(r["spec"])
        groups[(arm, detail, int(r["spec"]["batch"]))].append(r)
        if "pop_test_error" in r:
            pop[int(r["spec"]["batch"])].append(r["pop_test_error"])
    out = [
        Cell(
            arm,
            detail,
            n,
            summarize([r["test_error"] for r in rs]),
            summarize([r["train_error"] for r in rs]),
        )
        for (arm, detail, n), rs in sorted(groups.items())
    ]
    return out + [Cell(POP_ARM, "", n, summarize(v), None) for n, v in sorted(pop.items())]


def _main_arms(all_cells: list[Cell], gn_detail: str) -> dict[str, dict[int, Cell]]:
    """arm -> N -> cell for the batch-size study: GN (and GN+WS) at ``gn_detail`` only, the
    setting the claims compare (:func:`protocol.gn_setting`), not the sweep's others."""
    table: dict[str, dict[int, Cell]] = defaultdict(dict)
    for c in all_cells:
        if c.arm in ("GN", "GN+WS") and c.detail != gn_detail:
            continue
        table[c.arm][c.batch] = c
    return {a: table[a] for a in ORDER if a in table}


def _protocol_lines(records: list[dict[str, Any]], declared: tuple[str, int] | None) -> list[str]:
    """The pre-registered claims, each with its test, statistics, verdict and per-seed d.

    They are decided on test-split runs alone: a study with none (``--tune``, whose runs are
    evaluated on the validation split) lists them as not decided, and says why, rather than
    "n/a" for want of cells that its validation runs hold.
    """
    lines = ["## Pre-registered claims", ""]
    claims = decide(records, declared)
    if not any(r.get("evaluated_on", "test") == "test" for r in records):
        lines += [
            "Fixed in `groupnorm.study.protocol` before the real run and decided on test "
            "error (%) alone. These runs were evaluated on the validation split (`--tune`: "
            "recipe choice, which never decides a claim), so no claim is decided here; the "
            "same study without `--tune` decides them:",
            "",
        ]
        return lines + [f"- {c.name}. Test: {c.test}." for c in claims]
    lines += [
        "Fixed in `groupnorm.study.protocol` before the real run; test error (%), paired by "
        f"seed; margin {MARGIN:g} point(s). Every number below is recomputable from "
        "`results.jsonl` alone (`groupnorm study --report DIR`).",
        "",
    ]
    for c in claims:
        verdict = {True: "HOLDS", False: "NOT SHOWN", None: "n/a"}[c.verdict]
        lines.append(f"- **{verdict}** {c.name}. Test: {c.test}. Result: {c.statistics}.")
        for label, d in c.diffs.items():
            if d:
                per_seed = ", ".join(f"s{s} {v:+.2f}" for s, v in sorted(d.items()))
                lines.append(f"  Per-seed {label}: {per_seed}.")
    return lines


Errors = dict[tuple[str, int], dict[int, float]]


def _paired_line(a: dict[int, float], b: dict[int, float], name: str) -> list[str]:
    """``- name: mean a - b ... 95 % CI`` over the seeds both have (nothing under 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return []
    ci = paired([a[s] - b[s] for s in seeds])
    return [
        f"- {name}: mean {ci.mean:+.2f} points over {ci.n} seeds, 95 % CI "
        f"[{ci.lo:+.2f}, {ci.hi:+.2f}]"
    ]


def _control_lines(records: list[dict[str, Any]], declared: tuple[str, int] | None) -> list[str]:
    """Descriptive paired comparisons (not pre-registered claims): the control arms and GN's
    train error across N."""
    test = cell_errors(records, declared=declared)
    pop = cell_errors(records, "pop_test_error", declared)
    train = cell_errors(records, "train_error", declared)
    none: dict[int, float] = {}
    lines: list[str] = []
    for n in sorted({n for arm, n in test if arm == "syncbn"}, reverse=True):
        sync = test[("syncbn", n)]
        lines += _paired_line(sync, test.get(("bn", n), none), f"SyncBN({n}) - BN({n})")
        lines += _paired_line(sync, test.get(("bn", 32), none), f"SyncBN({n}) - BN(32)")
    for n in sorted({n for arm, n in pop if arm == "bn"}, reverse=True):
        lines += _paired_line(
            pop[("bn", n)],
            test.get(("bn", n), none),
            f"BN({n}), population minus running statistics (same weights)",
        )
    for n in sorted({n for arm, n in train if arm == "gn" and n != 32}, reverse=True):
        lines += _paired_line(
            train[("gn", n)],
            train.get(("gn", 32), none),
            f"GN train error, N={n} - N=32",
        )
    if not lines:
        return []
    return [
        "",
        "## Controls and train error (descriptive, not pre-registered)",
        "",
        "Paired by seed: mean difference of error (%) and its 95 % CI (Student's t). SyncBN "
        "normalizes over all devices (the same total batch, no small-batch statistics); "
        "population statistics re-estimated over a run's training images replace BN's running "
        "averages at evaluation (the same weights), which separates the train/test mismatch "
        "from noisy statistics during training.",
        "",
        *lines,
    ]


def _seed_lines(records: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    test = sorted({r["spec"]["seed"] for r in records if r.get("evaluated_on", "test") == "test"})
    val = sorted({r["spec"]["seed"] for r in records if r.get("evaluated_on") == "val"})
    lines = ["", "## Seeds", ""]
    if test:
        lines.append(f"- Reported (evaluated on the test set): {test}.")
    if val:
        lines.append(
            f"- Recipe choice (evaluated on the {config.get('val_size', '?')}-image validation "
            f"split held out of the training images): {val}."
        )
    overlap = sorted(set(test) & set(val))
    if overlap:
        lines.append(f"- **Seeds used for both**: {overlap}: these results are not clean.")
    lines.append(
        f"- Tuning seeds are {list(TUNING_SEEDS)} and up (`--tune`). Each seed trains on its "
        "own draw of training images from the pool (the whole pool when it is no larger than "
        "the training size, as for the generated strokes), and its own initialization."
    )
    return lines


def _batch_table(arms: dict[str, dict[int, Cell]], what: str, paper: bool) -> list[str]:
    batches = sorted({n for cs in arms.values() for n in cs}, reverse=True)
    head = "| arm | " + " | ".join(f"N={n}" for n in batches) + " |"
    lines = [head, "|---" * (len(batches) + 1) + "|"]
    for arm, cs in arms.items():
        if what == "train" and arm == POP_ARM:
            continue
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


def _train_of(cell: Cell) -> Summary:
    """A trained arm's train-error summary (every cell but the population-statistics ones)."""
    if cell.train is None:
        raise ValueError(f"{cell.arm} at N={cell.batch} has no train error")
    return cell.train


def _sweep_table(
    sweep: dict[int, Cell], name: str, paper: dict[int, float], split: str
) -> list[str]:
    keys = list(sweep)
    lines = [
        f"| {name} | " + " | ".join(str(k) for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
        f"| {split} error | " + " | ".join(sweep[k].test.fmt() for k in keys) + " |",
        "| train error | " + " | ".join(_train_of(sweep[k]).fmt() for k in keys) + " |",
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


def _plot_batch(arms: dict[str, dict[int, Cell]], path: Path, title: str, split: str) -> None:
    """Error vs N; ``split`` names what the cells' test summaries measured (test or
    validation)."""
    plt = _import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, what in zip(axes, ("test", "train"), strict=True):
        for arm, cs in arms.items():
            ns = sorted(cs, reverse=True)
            if not ns or (what == "train" and arm == POP_ARM):
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
        ax.set_ylabel(f"{split if what == 'test' else what} error (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title(f"{split} error, mean and 95 % CI over seeds")
    axes[1].set_title("train error (eval mode, end of the last epochs)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_groups(
    g: dict[int, Cell], cpg: dict[int, Cell], path: Path, title: str, split: str
) -> None:
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
                label=split,
            )
            train = [_train_of(sweep[k]).mean for k in ks]
            ax.plot(ks, train, "s--", color="tab:gray", label="train")
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


def _environment_sentence(records: list[dict[str, Any]]) -> str:
    """The software and CPUs the runs came from (records from before it was kept say nothing);
    runs are bitwise reproducible only within one."""
    kinds = sorted(
        {
            ("groupnorm " + e["groupnorm"] + ", " if "groupnorm" in e else "")
            + f"torch {e['torch']} on {e['cpu']} ({e['cpu_capability']})"
            for e in (r.get("environment") for r in records)
            if e
        }
    )
    if not kinds:
        return ""
    if len(kinds) == 1:
        return f" Runs from {kinds[0]}."
    return (
        f" Runs from {len(kinds)} environments ({'; '.join(kinds)}): a run repeated in "
        "another may differ in its last digits and more (training amplifies rounding)."
    )


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
    declared = ("groups", int(config["gn_groups"])) if "gn_groups" in config else None
    evaluated = "val" if config.get("evaluate") == "val" else "test"
    split = "validation" if evaluated == "val" else "test"
    # The tables show the split the header names, as the claims take the test split alone.
    shown = [r for r in records if r.get("evaluated_on", "test") == evaluated]
    gn = gn_setting(shown, declared) or declared or ("groups", 16)
    gn_detail = _arm({"norm": "gn", gn[0]: gn[1]})[1]
    all_cells = cells(shown)
    arms = _main_arms(all_cells, gn_detail)
    train = config.get("train", {})
    seeds = sorted({r["spec"]["seed"] for r in shown})
    minutes = sum(r.get("seconds", 0.0) for r in shown) / 60
    cpu_minutes = sum(r.get("cpu_seconds", 0.0) for r in shown) / 60
    width = train.get("width") or 0
    if gn[0] == "group_size":
        gn_text = f"{gn[1]} channels per group"
    else:
        by_stage = [c // min(gn[1], c) for c in (width, 2 * width, 4 * width)] if width else "?"
        gn_text = f"G={gn[1]} ({by_stage} channels per group by stage)"
    train_images = {int(r["train_images"]) for r in shown if "train_images" in r}
    setup = (
        f"data `{config.get('data', '?')}`: "
        f"{'/'.join(str(n) for n in sorted(train_images)) or config.get('train_size', '?')} "
        f"training images per run, drawn per seed from the pool left after holding out "
        f"{config.get('val_size', 0)} for validation; {config.get('test_size') or 'all'} "
        f"test images; errors measured on the **{split}** split. ResNet width {width} x "
        f"{train.get('blocks')} block(s) per stage, {train.get('epochs')} epochs, "
        f"{train.get('workers')} devices x N images per step, lr {train.get('lr')} x N/32, "
        f"metric the median of the last {train.get('eval_epochs')} epoch(s); GN with "
        f"{gn_text}; seeds {seeds}; {len(shown)} "
        f"runs, {minutes:.1f} run-minutes of wall time, {cpu_minutes:.1f} CPU-minutes."
    )
    eval_mode = all("running_train_error_per_epoch" in r for r in shown)
    setup += _environment_sentence(shown)
    lines = [
        "# Batch-size study: GroupNorm vs BatchNorm",
        "",
        setup,
        "",
        f"{split.capitalize()} error (%), median of the last epochs, mean ± 95 % CI "
        "(Student's t over seeds); the paper's ResNet-50 ImageNet numbers (Wu & He 2018) "
        f"beside each arm; {POP_ARM} is BN's runs evaluated with re-estimated population "
        "statistics:",
        "",
    ]
    lines += _batch_table(arms, "test", paper=True)
    lines += [
        "",
        "Train error (%), same runs, "
        + (
            "in eval mode at the end of the last epochs"
            if eval_mode
            else "the running train-mode error of the last epochs (records from before "
            "eval-mode train error)"
        )
        + " (the paper: GN optimizes better than BN):",
        "",
    ]
    lines += _batch_table(arms, "train", paper=False)
    g, per_group = _sweep(all_cells, "G"), _sweep(all_cells, "cpg")
    if len(g) > 1 or per_group:
        lines += [
            "",
            "Group sweep at N=32 (GN; a G above a layer's channel count means G = C "
            "there, a group wider than the layer means one group):",
            "",
        ]
        if len(g) > 1:
            lines += _sweep_table(g, "G", PAPER_GROUPS, split) + [""]
        if per_group:
            lines += _sweep_table(per_group, "channels/group", PAPER_CPG, split)
    lines += ["", *_protocol_lines(records, declared)]
    lines += _control_lines(records, declared)
    lines += _seed_lines(records, config)
    title = (
        f"{config.get('data', '?')}, ResNet width {train.get('width')}, "
        f"{train.get('epochs')} epochs, {train.get('workers')} devices x N, "
        f"{len(seeds)} seeds"
    )
    if plots:
        _plot_batch(arms, out / "batch_size.png", title, split)
        lines += ["", "![error vs batch size](batch_size.png)"]
        if len(g) > 1 or per_group:
            _plot_groups(g, per_group, out / "groups.png", title, split)
            lines += ["", "![error vs groups](groups.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
