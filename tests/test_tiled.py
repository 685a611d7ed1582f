"""Exact tiled decoding of a randomly initialized diffusers AutoencoderKL: equal to the untiled
decode for every strip height and store, on one process and patch-parallel on two."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

# diffusers is imported by the tests, not at collection: its import pulls in triton, which must
# first be imported interpreted by the kernel tests (tests/_triton_interpreted.py).
if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed", allow_module_level=True)

from groupnorm import tiled  # noqa: E402
from groupnorm.tiled import band_rows, tiled_decode  # noqa: E402
from tests._gloo import free_port, run_rank  # noqa: E402
from tests._tolerances import assert_matches, to_numpy  # noqa: E402

LATENT = (2, 4, 13, 10)  # odd height: the last strip is shorter


def _vae() -> torch.nn.Module:
    """SD's VAE layout, shrunk: 3 up blocks (two upsamplers), mid-block attention, a channel
    change with a 1x1 shortcut, 4 groups."""
    diffusers = importlib.import_module("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _latent() -> torch.Tensor:
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


@pytest.fixture(scope="module")
def untiled() -> torch.Tensor:
    with torch.no_grad():
        return _vae().decode(_latent()).sample


@pytest.fixture(scope="module")
def exact() -> np.ndarray:
    """The untiled decode in float64: what the float32 decodes are judged against."""
    with torch.no_grad():
        return to_numpy(_vae().double().decode(_latent().double()).sample)


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("tile_rows", [1, 2, 5, 13])
def test_tiled_equals_untiled(
    tile_rows: int, store: str, untiled: torch.Tensor, exact: np.ndarray
) -> None:
    """Against the float64 decode, within the whole-model rule with the untiled float32 decode
    (diffusers' own modules) as the baseline."""
    y = tiled_decode(_vae(), _latent(), tile_rows=tile_rows, store=store)
    assert y.shape == untiled.shape
    assert_matches(y, exact, torch.float32, baseline=untiled)


def test_per_tile_statistics_are_not_exact(untiled: torch.Tensor) -> None:
    """What the exactness buys: decoding a latent strip on its own (its own GroupNorm
    statistics, as per-tile decoding does) differs visibly from the whole image's rows."""
    vae, z = _vae(), _latent()
    with torch.no_grad():
        top = vae.decode(z[:, :, :7]).sample[:, :, : 6 * 4]
    assert (top - untiled[:, :, : 6 * 4]).abs().max() > 1e-2


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    tiled_decode(_vae(), _latent(), tile_rows=4, progress=True)
    assert "tiled decode" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("vae", "kwargs", "match"),
    [
        (torch.nn.Linear(2, 2), {}, "no diffusers Decoder"),
        (None, {"tile_rows": 0}, "tile_rows must be a positive int"),
        (None, {"store": "gpu"}, "store must be"),
    ],
)
def test_bad_arguments_are_refused(vae: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiled_decode(vae or _vae(), _latent(), **kwargs)


@pytest.mark.parametrize("fuse", [True, False])
def test_regression_a_swapped_decoder_decodes_with_its_plans_and_fused_activations(
    fuse: bool, untiled: torch.Tensor, exact: np.ndarray
) -> None:
    """Norms swapped to groupnorm's GroupNorm were applied as plain num_groups norms: their
    fused SiLU was dropped (the image 1.65 off) and an uneven plan ignored; a fully swapped
    decoder was refused as "GroupNorm, not nn.GroupNorm". Now both decode exactly."""
    import groupnorm

    vae, _ = groupnorm.swap_group_norm(_vae(), fuse_activation=fuse)
    y = tiled_decode(vae, _latent(), tile_rows=5)
    assert_matches(y, exact, torch.float32, baseline=untiled)
    uneven = _vae()
    resnet = uneven.decoder.up_blocks[0].resnets[0]
    resnet.norm1 = groupnorm.GroupNorm(num_channels=16, group_sizes=[2, 6, 4, 4])
    with torch.no_grad():
        whole = uneven.double().decode(_latent().double()).sample
        baseline = uneven.float().decode(_latent()).sample
    y = tiled_decode(uneven.float(), _latent(), tile_rows=5)
    assert_matches(y, to_numpy(whole), torch.float32, baseline=baseline)


def test_regression_tiled_decode_names_what_it_refuses() -> None:
    with pytest.raises(TypeError, match="z must be a torch.Tensor of latents"):
        tiled_decode(_vae(), _latent().numpy())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tile_rows must be a positive int"):
        tiled_decode(_vae(), _latent(), tile_rows=True)
    vae = _vae()
    vae.decoder.up_blocks[1].resnets[0].norm2 = torch.nn.InstanceNorm2d(16)
    with pytest.raises(ValueError, match="up block 1's norm2 is InstanceNorm2d"):
        tiled_decode(vae, _latent())


def test_regression_latents_and_band_arguments_are_checked_before_decoding() -> None:
    """A latent of the wrong channels, dtype, device or an empty dimension failed inside the
    first convolution or a reshape; process_group="x" raised AttributeError; band_rows with
    tile_rows=0, world=0 or rank >= world raised range(), ZeroDivision and IndexError errors,
    and a rank < 0 returned another rank's rows."""
    vae, z = _vae(), _latent()
    for bad, match in (
        (torch.randn(2, 5, 13, 10), "z has 5 channels, but this VAE decodes 4-channel latents"),
        (z.double(), r"z is torch.float64 on cpu, the VAE torch.float32 on cpu; use z.to"),
        (z.to("meta"), "z is torch.float32 on meta"),
        (z[:0], "no empty dimension, got shape"),
        (z[:, :, :, :0], "no empty dimension, got shape"),
    ):
        with pytest.raises(ValueError, match=match):
            tiled_decode(vae, bad)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        tiled_decode(vae, z, process_group="x")
    for args, match in (
        ((13, 0, 2, 0), "tile_rows must be a positive int"),
        ((13, 3, 0, 0), "world must be a positive int"),
        ((13, 3, 2, 2), r"rank must be an int in \[0, world=2\), got 2"),
        ((13, 3, 2, -1), r"rank must be an int in \[0, world=2\), got -1"),
        ((3, 1, 4, 0), "3 latent rows for 4 ranks"),
        ((13, 7, 3, 0), "2 tiles of 7 latent rows for 3 ranks"),
    ):
        with pytest.raises(ValueError, match=match):
            band_rows(*args)
    assert band_rows(np.int64(13), 3, 2, np.int64(1), upscale=4) == (9 * 4, 13 * 4)  # type: ignore[arg-type]
    for rank in ("0", True, 1.0):  # the other counts' rule: a wrong type is a TypeError
        with pytest.raises(TypeError, match=r"rank must be an int in \[0, world=2\)"):
            band_rows(13, 3, 2, rank)  # type: ignore[arg-type]


def test_unsupported_decoder_is_refused() -> None:
    vae = _vae()
    vae.decoder.conv_norm_out = torch.nn.LayerNorm(8)
    with pytest.raises(ValueError, match="conv_norm_out is LayerNorm"):
        tiled_decode(vae, _latent())


def _circular(vae: torch.nn.Module) -> None:
    for m in vae.decoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.padding_mode = "circular"


def _wide_conv_out(vae: torch.nn.Module) -> None:
    vae.decoder.conv_out = torch.nn.Conv2d(8, 3, 5, padding=2)


def _wrapped_conv(vae: torch.nn.Module) -> None:
    resnet = vae.decoder.up_blocks[0].resnets[0]
    resnet.conv1 = torch.nn.Sequential(resnet.conv1)


def _conv_act(vae: torch.nn.Module) -> None:
    vae.decoder.conv_act = torch.nn.Conv2d(8, 8, 3, padding=1)


def _dilated_upsampler(vae: torch.nn.Module) -> None:
    conv = vae.decoder.up_blocks[0].upsamplers[0].conv
    conv.dilation, conv.padding = (2, 2), (2, 2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_circular, "conv_out pads circularly"),
        (_wide_conv_out, r"conv_out is 5x5, stride \(1, 1\), padding \(2, 2\)"),
        (_wrapped_conv, "up block 0's conv1 is a Sequential, not a torch.nn.Conv2d"),
        (_dilated_upsampler, r"up block 0's upsampler conv is 3x3.*dilation \(2, 2\)"),
        (_conv_act, "conv_act is Conv2d; tiled decoding applies elementwise activations"),
    ],
)
def test_regression_convolutions_a_strip_cannot_take_are_refused(edit, match: str) -> None:
    """Only the resnets' kernel, padding and stride were checked: circular padding (seamless
    tiling) and a 5x5 conv_out decoded 1.34 and 0.54 off without an error, a wrapped conv
    raised AttributeError."""
    vae = _vae()
    edit(vae)
    with pytest.raises(ValueError, match=match):
        tiled_decode(vae, _latent())


@pytest.mark.parametrize("mode", ["reflect", "replicate", "same"])
def test_padding_a_strip_serves_is_decoded(mode: str) -> None:
    """Reflect and replicate padding, and padding="same", are exact in strips: a strip's padded
    rows feed only cropped halo rows or the image's own top and bottom edges."""
    vae = _vae()
    for m in vae.decoder.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            if mode == "same":
                m.padding = "same"
            else:
                m.padding_mode = mode  # type: ignore[assignment]
    with torch.no_grad():
        whole = vae.decode(_latent()).sample
    torch.testing.assert_close(tiled_decode(vae, _latent(), tile_rows=2), whole, rtol=0, atol=1e-4)


def test_regression_a_vq_model_is_refused() -> None:
    """VQModel's decoder has the same layout, but decode() quantizes the latents first, which
    tiled_decode skipped (1.47 off, no error)."""
    diffusers = importlib.import_module("diffusers")
    vq = diffusers.VQModel(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        num_vq_embeddings=8,
        vq_embed_dim=4,
    ).eval()
    with pytest.raises(ValueError, match="VQModel quantizes its latents"):
        tiled_decode(vq, _latent())


def test_regression_progress_takes_a_bool() -> None:
    """progress=0 and progress="no" showed the bar (only False hid it)."""
    for bad in (0, "no"):
        with pytest.raises(TypeError, match="progress must be True or False"):
            tiled_decode(_vae(), _latent(), progress=bad)  # type: ignore[arg-type]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    def body() -> None:
        torch.set_num_threads(1)
        vae, z, group = _vae(), _latent(), dist.group.WORLD
        steps: list[int] = []  # the progress bar's length, which counted rank 0's strips
        tiled._progress_bar = lambda progress, count, long: steps.append(count)  # type: ignore[assignment,func-returns-value]
        band = tiled_decode(vae, z, tile_rows=3, progress=True, process_group=group)
        torch.save((band, steps[0]), os.path.join(out, f"rank{rank}.pt"))
        # Ranks that disagree: one clear error on each, before any other collective (another
        # height decoded bands of different images; another width aborted gloo).
        for latent, rows in ((z[:, :, : 13 - rank], 3), (z[..., : 10 - rank], 3), (z, 3 + rank)):
            with pytest.raises(ValueError, match="every rank must pass the same z"):
                tiled_decode(vae, latent, tile_rows=rows, process_group=group)
        # One rank's own argument refused: the others raise too, instead of waiting for it.
        refused = "rank 1 refused its arguments" if rank == 0 else "store must be 'memory'"
        with pytest.raises(ValueError, match=refused):
            tiled_decode(vae, z, store="memory" if rank == 0 else "ram", process_group=group)

    run_rank(rank, world, port, body)


@pytest.mark.slow
def test_patch_parallel_decode_on_two_processes(
    tmp_path: Path, untiled: torch.Tensor, exact: np.ndarray
) -> None:
    """Two gloo processes, each decoding its band of strips: together the single-process
    decode (statistics merged across ranks, halo rows exchanged)."""
    world = 2
    tmp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    bands, steps = zip(*(torch.load(tmp_path / f"rank{r}.pt") for r in range(world)), strict=True)
    rows = [band_rows(LATENT[2], 3, world, r, upscale=4) for r in range(world)]
    assert rows == [(0, 9 * 4), (9 * 4, 13 * 4)]  # 5 strips of <= 3 latent rows: 3 + 2
    assert steps[0] / 3 == steps[1] / 2  # each rank's bar counts its own strips' passes
    assert [b.shape[2] for b in bands] == [b - a for a, b in rows]
    single = tiled_decode(_vae(), _latent(), tile_rows=3)
    whole = torch.cat(bands, dim=2)
    assert_matches(whole, exact, torch.float32, baseline=untiled)
    assert_matches(single, exact, torch.float32, baseline=untiled)
