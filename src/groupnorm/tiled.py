"""Exact tiled decoding of a diffusers ``AutoencoderKL`` latent: every GroupNorm uses the whole
image's statistics, every convolution sees the halo its tile needs.

Tiles are full-width strips of ``tile_rows`` latent rows (``8 * tile_rows`` image rows for the
SD VAE). The decoder runs segment by segment, a segment being the local operations between two
GroupNorm statistics (conv, SiLU, nearest upsampling, residual add)::

    z -> post_quant_conv -> conv_in -> mid_block                      whole, at latent size
    for each up block:   for each resnet:  H = conv1(act(norm1(X)))    one pass over the strips
                                           X = shortcut(X) + conv2(act(norm2(H)))   another
                         upsampler:        X = conv(upsample2x(X))     another
    image = conv_out(act(conv_norm_out(X)))                            the last pass

Each pass reads, for every strip, its rows plus one row of halo above and below (the one 3x3
convolution in a segment needs exactly that: the rows a cut corrupts are cropped), and writes the
strip's rows. The statistics a GroupNorm needs are gathered from the stored strips of its input
(``group_stats`` per strip, merged exactly with ``merge_stats``) before the pass that normalizes
with them (``group_norm(..., stats=)``). No activation is computed twice.

Why the mid block is not tiled: its attention mixes every latent position, so no halo makes a
tile exact; it runs at latent size (1/64 of the image's positions), where memory is small.

Between passes the strips are kept in memory (``store="memory"``) or in a temporary directory
(``store="disk"``: then the process holds only a few strips at a time; the peak falls with
``tile_rows``). With ``process_group``, each rank decodes a contiguous band of strips (patch
parallelism): statistics are merged across ranks (:mod:`groupnorm.distributed`) and the one
halo row at each band edge is exchanged with an all-gather after every pass; the mid block runs
on every rank.

Use with a pretrained pipeline (weights downloaded by diffusers as usual)::

    pipe = StableDiffusionPipeline.from_pretrained(...)
    latents = pipe(prompt, output_type="latent").images
    image = groupnorm.tiled.tiled_decode(pipe.vae, latents / pipe.vae.config.scaling_factor)
    image = pipe.image_processor.postprocess(image)

Supported: ``AutoencoderKL`` decoders built from ``UpDecoderBlock2D`` (ResnetBlock2D without a
time embedding, ``Upsample2D`` with a 3x3 convolution) and a GroupNorm ``conv_norm_out``: the
SD 1.x / 2.x / XL / 3 / Flux VAEs. Anything else is refused with the reason.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from groupnorm.distributed import (
    all_gather_stats,
    every_rank,
    refused_together,
)
from groupnorm.functional import check_flag, group_norm, group_stats, resolve_plan
from groupnorm.groups import positive_int
from groupnorm.modules import GroupNorm, GroupNormAct
from groupnorm.stats import GroupStats, merge_stats

__all__ = ["band_rows", "tiled_decode"]

# A progress bar is shown by default from this many latent positions on: a 1024 px SD image
# (128 x 128 latents) takes minutes to decode on a CPU; a 512 px one well under one.
AUTO_PROGRESS_POSITIONS = 128 * 128

_AGREED = 6  # numbers _check_ranks_agree gathers: z's shape, tile_rows and z's dtype


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _strips(height: int, tile_rows: int) -> list[tuple[int, int]]:
    """Latent row ranges [a, b) of the strips, top to bottom."""
    return [(a, min(a + tile_rows, height)) for a in range(0, height, tile_rows)]


def band_rows(
    latent_height: int, tile_rows: int, world: int, rank: int, upscale: int = 8
) -> tuple[int, int]:
    """Image rows [start, end) that rank ``rank`` of ``world`` returns from a patch-parallel
    :func:`tiled_decode` (strips are dealt out in contiguous runs, earlier ranks one more)."""
    latent_height = positive_int("latent_height", latent_height)
    tile_rows = positive_int("tile_rows", tile_rows)
    world = positive_int("world", world)
    upscale = positive_int("upscale", upscale)
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"rank must be an int in [0, world={world}), got {rank!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
    strips = _strips(latent_height, tile_rows)
    _check_tiles(len(strips), latent_height, tile_rows, world)
    mine = _rank_strips(len(strips), world, rank)
    return strips[mine[0]][0] * upscale, strips[mine[-1]][1] * upscale


def _check_tiles(count: int, latent_height: int, tile_rows: int, world: int) -> None:
    if latent_height < world:
        raise ValueError(
            f"{latent_height} latent rows for {world} ranks: every rank needs at least one row; "
            f"decode on at most {latent_height} ranks"
        )
    if count < world:
        raise ValueError(
            f"{count} tiles of {tile_rows} latent rows for {world} ranks: every rank needs "
            f"one; use tile_rows <= {latent_height // world}"
        )


def _rank_strips(count: int, world: int, rank: int) -> range:
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class _Plane:
    """One activation of the whole image, (N, C, rows, W), held as this rank's strips plus the
    single rows just outside its band (ghosts) that the next pass's halo needs."""

    def __init__(self, run: _Run, scale: int) -> None:
        self.run = run
        self.scale = scale  # rows per latent row
        self.parts: dict[int, torch.Tensor | str] = {}
        self.ghosts: dict[int, torch.Tensor] = {}  # image row -> (N, C, 1, W)
        self._stats: dict[tuple[int, ...], GroupStats] = {}
        self._files: list[str] = []
        # A plane's files go when the plane does: disk use stays at the live planes.
        weakref.finalize(self, _remove_files, self._files)

    def rows(self, k: int) -> tuple[int, int]:
        a, b = self.run.strips[k]
        return a * self.scale, b * self.scale

    @property
    def height(self) -> int:
        return self.run.strips[-1][1] * self.scale

    def put(self, k: int, t: torch.Tensor) -> None:
        if self.run.store_dir is None:
            self.parts[k] = t
        else:
            path = os.path.join(self.run.store_dir, f"{id(self)}-{k}.pt")
            torch.save(t, path)
            self.parts[k] = path
            self._files.append(path)

    def get(self, k: int) -> torch.Tensor:
        part = self.parts[k]
        return part if isinstance(part, torch.Tensor) else torch.load(part, weights_only=True)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) from the strips and ghosts that hold them."""
        pieces = []
        for k in self.run.mine:
            a, b = self.rows(k)
            if a < r1 and r0 < b:
                pieces.append((a, self.get(k)[:, :, max(r0, a) - a : min(r1, b) - a]))
        pieces += [(row, t) for row, t in self.ghosts.items() if r0 <= row < r1]
        pieces.sort(key=lambda p: p[0])
        out = torch.cat([t for _, t in pieces], dim=2)
        assert out.shape[2] == r1 - r0, "a halo row is missing"
        return out

    def exchange_ghosts(self) -> None:
        """All-gather every band's first and last row; keep the rows next to this band."""
        group = self.run.group
        if group is None:
            return
        first, last = self.run.mine[0], self.run.mine[-1]
        start, end = self.rows(first)[0], self.rows(last)[1]
        edges = torch.cat(
            [self.get(first)[:, :, :1], self.get(last)[:, :, -1:]], dim=2
        ).contiguous()
        every = [torch.empty_like(edges) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, edges, group=group)
        for r, t in enumerate(every):
            band = _rank_strips(len(self.run.strips), len(every), r)
            top, bottom = self.rows(band[0])[0], self.rows(band[-1])[1] - 1
            if bottom == start - 1:
                self.ghosts[bottom] = t[:, :, 1:2]
            if top == end:
                self.ghosts[top] = t[:, :, 0:1]

    def stats(self, norm: nn.GroupNorm) -> GroupStats:
        """The whole image's statistics for ``norm``'s groups, merged over strips and ranks."""
        sizes = _group_sizes(norm)
        if sizes not in self._stats:
            merged = None
            for k in self.run.mine:
                s = group_stats(self.get(k), group_sizes=sizes)
                merged = s if merged is None else merge_stats(merged, s)
            assert merged is not None
            if self.run.group is not None:
                merged = all_gather_stats(merged, self.run.group)
            self._stats[sizes] = merged
        return self._stats[sizes]

    def whole(self) -> torch.Tensor:
        return torch.cat([self.get(k) for k in self.run.mine], dim=2)


class _Run:
    def __init__(
        self,
        strips: list[tuple[int, int]],
        group: Any,
        store_dir: str | None,
        bar: Any,
    ) -> None:
        self.strips = strips
        self.group = group
        world, rank = (
            (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
        )
        self.mine = _rank_strips(len(strips), world, rank)
        self.store_dir = store_dir
        self.bar = bar

    def split(self, whole: torch.Tensor) -> _Plane:
        plane = _Plane(self, whole.shape[2] // self.strips[-1][1])
        for k in self.mine:
            a, b = plane.rows(k)
            plane.put(k, whole[:, :, a:b].clone())
        plane.exchange_ghosts()
        return plane

    def apply(
        self, fn: Callable[..., torch.Tensor], inputs: list[_Plane], factor: int = 1
    ) -> _Plane:
        """``fn`` (one 3x3 convolution deep, rows scaled by ``factor``) over every strip, each
        read with one halo row on both sides and its output cropped back to the strip."""
        src = inputs[0]
        out = _Plane(self, src.scale * factor)
        for k in self.mine:
            a, b = src.rows(k)
            r0, r1 = max(a - 1, 0), min(b + 1, src.height)
            y = fn(*(p.read(r0, r1) for p in inputs))
            off = (a - r0) * factor
            out.put(k, y[:, :, off : off + (b - a) * factor].clone())
            if self.bar is not None:
                self.bar.update(1)
        out.exchange_ghosts()
        return out


def _group_sizes(norm: nn.GroupNorm) -> tuple[int, ...]:
    """``norm``'s groups: our GroupNorm's plan (uneven ones included), else num_groups even."""
    if isinstance(norm, GroupNorm):
        return norm._current_plan().sizes
    return resolve_plan(norm.num_channels, norm.num_groups).sizes


def _normalized(t: torch.Tensor, norm: nn.GroupNorm, stats: GroupStats) -> torch.Tensor:
    """``norm`` on a strip with the whole image's statistics, its fused activation included (a
    swap_group_norm'ed decoder's SiLU is in its norms; the module after them is an Identity)."""
    return group_norm(
        t,
        weight=norm.weight,
        bias=norm.bias,
        eps=norm.eps,
        group_sizes=_group_sizes(norm),
        activation=getattr(norm, "activation", None),
        stats=stats,
    )


def _why_not_norm(norm: object, name: str) -> str | None:
    """Why ``norm`` cannot be applied strip by strip with merged statistics here, or None: it
    must be torch's GroupNorm or ours (any plan, a fused activation), nothing that does more."""
    if type(norm) is not nn.GroupNorm and type(norm) not in (GroupNorm, GroupNormAct):
        return (
            f"{name} is {type(norm).__name__}; tiled decoding applies torch.nn.GroupNorm and "
            "groupnorm.GroupNorm / GroupNormAct (any groups, a fused activation) only"
        )
    if getattr(norm, "process_group", None) is not None:
        return f"{name} has a process_group; pass process_group= to tiled_decode instead"
    return None


def _resnet(run: _Run, block: Any, x: _Plane) -> _Plane:
    """diffusers' ResnetBlock2D (no time embedding) as two passes."""
    act = block.nonlinearity
    s1 = x.stats(block.norm1)
    h = run.apply(lambda t: block.conv1(act(_normalized(t, block.norm1, s1))), [x])
    s2 = h.stats(block.norm2)
    skip = block.conv_shortcut or nn.Identity()

    def second(xt: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        out = block.conv2(block.dropout(act(_normalized(ht, block.norm2, s2))))
        return (skip(xt) + out) / block.output_scale_factor

    return run.apply(second, [x, h])


def _why_not_conv(conv: object, name: str, kernel: int) -> str | None:
    """Why ``conv`` is not a local ``kernel`` x ``kernel`` convolution the strips' one-row halo
    serves (stride 1, padding kernel // 2 on each side, no dilation, not circular), or None.
    Zero, reflect and replicate padding are exact: a strip's padded rows feed only the halo
    rows that are cropped, or the image's own top or bottom edge."""
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is a {type(conv).__name__}, not a torch.nn.Conv2d"
    pad = kernel // 2
    if (
        conv.kernel_size != (kernel, kernel)
        or conv.stride != (1, 1)
        or conv.padding not in ((pad, pad), "same")
        or conv.dilation != (1, 1)
    ):
        return (
            f"{name} is {conv.kernel_size[0]}x{conv.kernel_size[1]}, stride {conv.stride}, "
            f"padding {conv.padding}, dilation {conv.dilation}: the strips' halo serves "
            f"{kernel}x{kernel}, stride 1, padding {pad}, no dilation"
        )
    if conv.padding_mode == "circular" and pad:
        return (
            f"{name} pads circularly: a strip's edge would wrap around to its own rows, not "
            "the image's"
        )
    return None


# Activations between a norm and a conv: elementwise, so a strip computes them alone.
_ELEMENTWISE = (
    nn.SiLU,
    nn.Mish,
    nn.GELU,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Identity,
)


def _why_not_act(act: object, name: str) -> str | None:
    if type(act) not in _ELEMENTWISE:
        return (
            f"{name} is {type(act).__name__}; tiled decoding applies elementwise activations "
            f"only ({', '.join(t.__name__ for t in _ELEMENTWISE)})"
        )
    return None


def _unsupported(vae: Any) -> str | None:
    """Why ``vae``'s decoder cannot be tiled exactly here, or None."""
    dec = getattr(vae, "decoder", None)
    if dec is None or not hasattr(dec, "up_blocks") or not hasattr(dec, "mid_block"):
        return f"{type(vae).__name__} has no diffusers Decoder (vae.decoder.up_blocks)"
    if hasattr(vae, "quantize"):
        return (
            f"{type(vae).__name__} quantizes its latents (vae.quantize) before decoding; "
            "tiled_decode decodes AutoencoderKL latents"
        )
    if (why := _why_not_norm(getattr(dec, "conv_norm_out", None), "conv_norm_out")) is not None:
        return why
    if (why := _why_not_act(getattr(dec, "conv_act", None), "conv_act")) is not None:
        return why
    if (why := _why_not_conv(getattr(dec, "conv_out", None), "conv_out", 3)) is not None:
        return why
    for i, block in enumerate(dec.up_blocks):
        if not hasattr(block, "resnets") or getattr(block, "attentions", None):
            return f"up block {i} ({type(block).__name__}) is not an UpDecoderBlock2D"
        for resnet in block.resnets:
            if type(resnet).__name__ != "ResnetBlock2D":
                return f"up block {i} has a {type(resnet).__name__}, not a ResnetBlock2D"
            if resnet.time_emb_proj is not None or resnet.upsample or resnet.downsample:
                return f"up block {i}: a resnet with a time embedding or resampling"
            for name in ("norm1", "norm2"):
                if (
                    why := _why_not_norm(getattr(resnet, name), f"up block {i}'s {name}")
                ) is not None:
                    return why
            if (
                why := _why_not_act(resnet.nonlinearity, f"up block {i}'s nonlinearity")
            ) is not None:
                return why
            convs = [(resnet.conv1, "conv1", 3), (resnet.conv2, "conv2", 3)]
            if resnet.conv_shortcut is not None:
                convs.append((resnet.conv_shortcut, "conv_shortcut", 1))
            for conv, name, kernel in convs:
                if (why := _why_not_conv(conv, f"up block {i}'s {name}", kernel)) is not None:
                    return why
        for up in block.upsamplers or []:
            conv = getattr(up, "conv", None)
            if (
                type(up).__name__ != "Upsample2D"
                or up.use_conv_transpose
                or up.norm is not None
                or not up.interpolate
                or conv is None
            ):
                return f"up block {i}: an upsampler other than nearest 2x + 3x3 conv"
            if (why := _why_not_conv(conv, f"up block {i}'s upsampler conv", 3)) is not None:
                return why
    return None


@contextlib.contextmanager
def _store(kind: str) -> Iterator[str | None]:
    if kind == "memory":
        yield None
    else:
        with tempfile.TemporaryDirectory(prefix="groupnorm-tiles-") as d:
            yield d


def tiled_decode(
    vae: Any,
    z: torch.Tensor,
    *,
    tile_rows: int = 16,
    store: str = "memory",
    progress: bool | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    """Decode latents ``z`` (N, latent_channels, h, w) with ``vae.decoder`` in strips of
    ``tile_rows`` latent rows: the same image as ``vae.decode(z).sample`` up to float rounding.

    ``store``: ``"memory"`` or ``"disk"`` (activations between passes in a temporary directory).
    ``progress``: a tqdm bar over the strip passes (default: on for long decodes when tqdm is
    installed). ``process_group``: decode across ranks; each returns its band of image rows,
    :func:`band_rows` (every rank must pass the same ``z``). Runs under ``torch.no_grad``.
    """
    refusal: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if process_group is not None:
        refusal = refused_together(process_group, _AGREED)
    with refusal:
        reason = _unsupported(vae)
        if reason is not None:
            raise ValueError(f"tiled_decode cannot decode this VAE exactly: {reason}")
        _check_latent(vae, z)
        tile_rows = positive_int("tile_rows", tile_rows)
        if store not in ("memory", "disk"):
            raise ValueError(f"store must be 'memory' or 'disk', got {store!r}")
        if progress is not None:
            check_flag("progress", progress)
    strips = _strips(z.shape[2], tile_rows)
    world = 1
    if process_group is not None:
        _check_ranks_agree(z, tile_rows, process_group)
        world = dist.get_world_size(process_group)
    _check_tiles(len(strips), z.shape[2], tile_rows, world)
    dec = vae.decoder
    passes = sum(2 * len(b.resnets) + len(b.upsamplers or []) for b in dec.up_blocks) + 1
    rank = 0 if process_group is None else dist.get_rank(process_group)
    steps = passes * len(_rank_strips(len(strips), world, rank))
    bar = _progress_bar(progress, steps, long=z.shape[2] * z.shape[3] >= AUTO_PROGRESS_POSITIONS)
    try:
        with torch.no_grad(), _store(store) as store_dir:
            run = _Run(strips, process_group, store_dir, bar)
            h = z if vae.post_quant_conv is None else vae.post_quant_conv(z)
            x = run.split(dec.mid_block(dec.conv_in(h)))
            for block in dec.up_blocks:
                for resnet in block.resnets:
                    x = _resnet(run, resnet, x)
                for up in block.upsamplers or []:
                    x = run.apply(up, [x], factor=2)
            norm, s = dec.conv_norm_out, x.stats(dec.conv_norm_out)
            out = run.apply(lambda t: dec.conv_out(dec.conv_act(_normalized(t, norm, s))), [x])
            return out.whole()
    finally:
        if bar is not None:
            bar.close()


def _check_latent(vae: Any, z: object) -> None:
    """z as the decoder takes it: (N, C, h, w) with N, h, w >= 1, the decoder's latent channels,
    dtype and device."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of latents (N, C, h, w), got {type(z).__name__}")
    if z.dim() != 4 or 0 in z.shape:
        raise ValueError(
            f"z must be a (N, C, h, w) latent tensor with no empty dimension, got shape "
            f"{tuple(z.shape)}"
        )
    first = vae.decoder.conv_in if vae.post_quant_conv is None else vae.post_quant_conv
    if z.shape[1] != first.in_channels:
        raise ValueError(
            f"z has {z.shape[1]} channels, but this VAE decodes {first.in_channels}-channel latents"
        )
    weight = first.weight
    if z.dtype != weight.dtype or z.device != weight.device:
        raise ValueError(
            f"z is {z.dtype} on {z.device}, the VAE {weight.dtype} on {weight.device}; "
            f"use z.to({weight.device.type!r}, {weight.dtype})"
        )


def _check_ranks_agree(z: torch.Tensor, tile_rows: int, group: Any) -> None:
    """Raise on every rank, before any other collective, unless all ranks decode latents of
    the same shape and dtype in strips of the same height: otherwise the bands belong to
    different images (or do not cover one), and gathers of different sizes abort a gloo
    process (an error Python cannot catch). One all_gather of six int64 numbers."""
    # crc32, not hash(): a str's hash differs between processes
    mine = [*z.shape, tile_rows, zlib.crc32(str(z.dtype).encode())]
    assert len(mine) == _AGREED
    seen = every_rank(mine, group)
    if len(set(seen)) > 1:
        rows = "; ".join(
            f"rank {r}: z {tuple(v[:4])}, tile_rows {v[4]}" for r, v in enumerate(seen)
        )
        raise ValueError(
            "tiled_decode(process_group=): every rank must pass the same z (shape and dtype) "
            f"and tile_rows, and each returns its band of the image; got {rows}"
            + ("" if len({v[:5] for v in seen}) > 1 else ", and different dtypes")
        )


def _progress_bar(progress: bool | None, steps: int, long: bool) -> Any:
    if progress is False or (progress is None and not long):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError(
                "progress=True needs tqdm: pip install tqdm (or groupnorm[study])"
            ) from None
        return None
    return tqdm(total=steps, desc="tiled decode", unit="strip")
