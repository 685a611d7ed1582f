"""Exact tiled VAE decoding against the untiled decode and diffusers' ``enable_tiling``.

An SD 1.5-shaped ``AutoencoderKL`` (its published config, random weights, seed 0, float32)
decodes one random latent per size (512 and 1024 px) four ways: untiled (``vae.decode``),
``groupnorm.tiled.tiled_decode`` with its strips kept in memory or on disk, and diffusers' own
``enable_tiling``. Each case runs in a fresh subprocess, and its peak memory is that process's
high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the resident set, model and
Python included); the table also gives the mark before the decode, so the decode's own share is
the difference. Max abs difference is to the untiled decode of the same latent. A PNG of the
difference maps at the largest size goes to docs/.

    nice python benchmarks/tiled_vae.py [--sizes 512 1024] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cpu_standard import add_out, count, save, writable_dir

# diffusers' AutoencoderKL config of runwayml/stable-diffusion-v1-5 (vae/config.json).
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}


def _cases(size: int, args: argparse.Namespace) -> list[dict]:
    """Untiled first (the reference), then ours per store and strip height, then diffusers'
    tiling with the largest tile (of --diffusers-tiles) smaller than the image."""
    cases: list[dict] = [{"method": "untiled"}]
    cases += [{"method": "groupnorm", "store": "memory", "tile_rows": args.tile_rows[0]}]
    cases += [{"method": "groupnorm", "store": "disk", "tile_rows": r} for r in args.tile_rows]
    tiles = [t for t in args.diffusers_tiles if t < size]
    if tiles:
        cases.append({"method": "diffusers", "tile": max(tiles)})
    return [dict(c, size=size) for c in cases]


def _label(case: dict) -> str:
    if case["method"] == "groupnorm":
        return f"groupnorm tiled, {case['tile_rows'] * 8}-row strips, {case['store']}"
    if case["method"] == "diffusers":
        return f"diffusers enable_tiling, {case['tile']} px tiles"
    return "untiled vae.decode"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_case(case: dict, out: Path, threads: int) -> None:
    """One decode in this (fresh) process: the image to ``out``.npy, numbers to ``out``.json."""
    from diffusers import AutoencoderKL

    from groupnorm.tiled import tiled_decode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).eval()
    z = torch.randn(
        1, 4, case["size"] // 8, case["size"] // 8, generator=torch.Generator().manual_seed(1)
    )
    before = _rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        if case["method"] == "groupnorm":
            image = tiled_decode(
                vae, z, tile_rows=case["tile_rows"], store=case["store"], progress=False
            )
        else:
            if case["method"] == "diffusers":
                vae.enable_tiling()
                vae.tile_sample_min_size = case["tile"]
                vae.tile_latent_min_size = case["tile"] // 8
            image = vae.decode(z).sample
    seconds = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), image.numpy())
    out.with_suffix(".json").write_text(
        json.dumps({"rss_before_mib": before, "peak_rss_mib": _rss_mib(), "seconds": seconds})
    )


def _difference_png(images: dict[str, np.ndarray], size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = images["untiled vae.decode"]
    # Ours on disk (memory gives the same image) and diffusers', at most three panels.
    ours = [k for k in images if k.startswith("groupnorm") and "memory" not in k]
    theirs = [k for k in images if k.startswith("diffusers")]
    shown = ours[: 3 - len(theirs)] + theirs
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.6))
    for ax, name in zip(np.atleast_1d(axes), shown, strict=False):
        diff = np.abs(images[name] - ref)[0].max(axis=0)  # (H, W): worst channel per pixel
        im = ax.imshow(np.log10(diff + 1e-9), vmin=-9, vmax=0, cmap="magma")
        ax.set_title(f"{name}\nmax |diff| {diff.max():.1e}", fontsize=9)
        ax.axis("off")
    fig.colorbar(
        im, ax=axes, shrink=0.8, label="log10 |tiled - untiled| (per pixel, worst channel)"
    )
    fig.suptitle(f"SD 1.5 VAE (random weights), {size} px decode: difference to untiled")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--threads", type=count(1), default=2, help="torch CPU threads per case")
    parser.add_argument(
        "--tile-rows",
        type=int,
        nargs="+",
        default=[16],
        help="latent rows per strip (x8 image rows); the first also runs with store=memory",
    )
    parser.add_argument(
        "--diffusers-tiles",
        type=int,
        nargs="+",
        default=[256, 512],
        help="diffusers tile sizes in px (its default is sample_size, 512): the largest below "
        "the image size runs",
    )
    add_out(parser)
    parser.add_argument("--png", type=writable_dir, default=str(Path(__file__).parents[1] / "docs"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case
    parser.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(json.loads(args.case), args.case_out, args.threads)
        return
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            images: dict[str, np.ndarray] = {}
            for i, case in enumerate(_cases(size, args)):
                out = Path(tmp) / f"{size}-{i}"
                cmd = [sys.executable, __file__, "--case", json.dumps(case), "--case-out", str(out)]
                subprocess.run(cmd + ["--threads", str(args.threads)], check=True)
                numbers = json.loads(out.with_suffix(".json").read_text())
                image = np.load(out.with_suffix(".npy"))
                label = _label(case)
                images[label] = image
                ref = images["untiled vae.decode"]
                row = dict(case, label=label, **numbers)
                row["max_abs_diff"] = float(np.abs(image - ref).max())
                row["output_std"] = float(image.std())
                rows.append(row)
                print(
                    f"{size:>5} px  {label:<44} max|diff| {row['max_abs_diff']:.2e}  "
                    f"peak {row['peak_rss_mib']:7.0f} MiB (before decode "
                    f"{row['rss_before_mib']:5.0f})  {row['seconds']:7.1f} s",
                    flush=True,
                )
            _difference_png(images, size, args.png / f"tiled-vae-diff-{size}.png")
    for size in args.sizes:
        base = next(r for r in rows if r["size"] == size and r["method"] == "untiled")
        for r in rows:
            if r["size"] == size:
                r["peak_ratio_untiled_over_this"] = base["peak_rss_mib"] / r["peak_rss_mib"]
    print(
        "\n| size | method | max abs diff to untiled | peak RSS (MiB) | untiled / this | time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['label']} | {r['max_abs_diff']:.1e} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_ratio_untiled_over_this']:.1f}x | {r['seconds']:.0f} |"
        )
    save(args.out, "tiled_vae-" + "-".join(map(str, args.sizes)), rows)


if __name__ == "__main__":
    main()
