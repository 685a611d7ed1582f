"""Per-device BatchNorm emulation, the study's norm arms and the paper's initialization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groupnorm import WSConv2d
from groupnorm import reference as ref
from groupnorm.study.config import RunSpec, TrainConfig
from groupnorm.study.models import (
    PerDeviceBatchNorm2d,
    ResNet,
    make_norm,
    reestimate_bn,
    set_virtual_devices,
)
from groupnorm.study.training import lr_at
from tests._tolerances import assert_matches


def _affine(bn: torch.nn.Module, gen: torch.Generator) -> None:
    w, b = bn.weight, bn.bias
    assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    with torch.no_grad():
        w.copy_(torch.rand(w.shape, generator=gen, dtype=w.dtype) + 0.5)
        b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("devices,n", [(4, 2), (2, 3), (8, 1)])
def test_per_device_bn_normalizes_each_chunk_alone(
    dtype: torch.dtype, devices: int, n: int
) -> None:
    gen = torch.Generator().manual_seed(devices * 10 + n)
    C = 6
    # Chunks with different offsets and scales, so per-chunk and full-batch statistics differ.
    x = (
        torch.randn(devices * n, C, 5, 4, generator=gen, dtype=torch.float64)
        * torch.linspace(0.5, 3, devices).repeat_interleave(n).view(-1, 1, 1, 1)
        + torch.linspace(-2, 2, devices).repeat_interleave(n).view(-1, 1, 1, 1)
    ).to(dtype)
    bn = PerDeviceBatchNorm2d(C, devices=devices).to(dtype)
    _affine(bn, gen)
    y = bn(x)
    g, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    xs = x.double().numpy()
    chunks = [ref.batch_norm(xs[k * n : (k + 1) * n], g, b)[0] for k in range(devices)]
    assert_matches(y, np.concatenate(chunks), dtype, reduction=n * 20, what="per-device BN")
    full = ref.batch_norm(xs, g, b)[0]
    assert np.abs(y.detach().double().numpy() - full).max() > 0.1, (
        "per-device statistics must differ from the full batch's"
    )
    # Running statistics: the average over devices of each chunk's mean and unbiased variance.
    count = n * 20
    means = np.stack([xs[k * n : (k + 1) * n].mean(axis=(0, 2, 3)) for k in range(devices)])
    vars_ = np.stack(
        [xs[k * n : (k + 1) * n].var(axis=(0, 2, 3)) * count / (count - 1) for k in range(devices)]
    )
    assert_matches(bn.running_mean, 0.1 * means.mean(0), dtype, what="running_mean")
    assert_matches(bn.running_var, 0.9 + 0.1 * vars_.mean(0), dtype, what="running_var")
    # Eval mode: the running statistics, as plain BatchNorm2d.
    bn.eval()
    plain = torch.nn.BatchNorm2d(C).to(dtype)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert torch.equal(bn(x), plain(x))


def test_per_device_bn_one_device_is_batchnorm() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 3, 3, generator=gen)
    bn, plain = PerDeviceBatchNorm2d(4), torch.nn.BatchNorm2d(4)
    _affine(bn, gen)
    plain.load_state_dict(bn.state_dict())
    assert torch.equal(bn(x), plain(x))
    assert bn.running_var is not None and plain.running_var is not None
    assert torch.equal(bn.running_var, plain.running_var)


def test_per_device_bn_rejects_bad_batches() -> None:
    bn = PerDeviceBatchNorm2d(4, devices=3)
    with pytest.raises(ValueError, match="multiple of 3"):
        bn(torch.randn(8, 4, 2, 2))
    bn = PerDeviceBatchNorm2d(4, devices=4)
    with pytest.raises(ValueError, match="more than one value"):
        bn(torch.randn(4, 4, 1, 1))


@pytest.mark.parametrize("norm,kw", [("gn", {"num_groups": 2}), ("ln", {}), ("in", {})])
def test_batch_independent_norms_ignore_the_chunking(norm: str, kw: dict[str, int]) -> None:
    """GN/LN/IN never look across samples: a sample's output is the same whether the batch is
    split into devices or not, and equals the float64 reference."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    layer = make_norm(norm, **kw)(4).double()
    _affine(layer, gen)
    y_full = layer(x)
    y_chunks = torch.cat([layer(c) for c in x.split(2)])
    assert torch.equal(y_full, y_chunks)
    G = {"gn": 2, "ln": 1, "in": 4}[norm]
    expected, _ = ref.group_norm_forward(
        x.numpy(), G, layer.weight.detach().numpy(), layer.bias.detach().numpy()
    )
    assert_matches(y_full, expected, torch.float64, what=norm)


def test_resnet_uses_the_papers_init() -> None:
    model = ResNet(make_norm("gn", 4), width=8)
    last = {id(b.norm2) for b in model.layers}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(torch.all(m.bias == 0) for m in norms)
    for m in norms:
        expected = 0.0 if id(m) in last else 1.0
        assert torch.all(m.weight == expected)
    # Stem conv: He (fan-out) normal, std sqrt(2 / (out_channels * 9)).
    std = model.stem.weight.std().item()
    assert 0.5 * np.sqrt(2 / 72) < std < 1.5 * np.sqrt(2 / 72)


def test_group_sweep_caps_at_the_layer_width() -> None:
    assert make_norm("gn", num_groups=32)(16).num_groups == 16  # G > C: InstanceNorm there
    assert make_norm("gn", group_size=32)(16).num_groups == 1  # group wider than C: LN
    assert make_norm("gn", group_size=4)(16).num_groups == 4
    with pytest.raises(ValueError, match="exactly one"):
        make_norm("gn")
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("batch")


def test_set_virtual_devices_reaches_every_bn() -> None:
    model = ResNet(make_norm("bn"), width=4)
    set_virtual_devices(model, 4)
    bns = [m for m in model.modules() if isinstance(m, PerDeviceBatchNorm2d)]
    assert len(bns) == 9 and all(m.devices == 4 for m in bns)


def test_learning_rate_schedule() -> None:
    base, total = 0.4, 100
    assert lr_at(0, total, base, 0.1) == pytest.approx(0.04)
    assert lr_at(9, total, base, 0.1) == pytest.approx(0.4)
    assert lr_at(49, total, base, 0.1) == pytest.approx(0.4)
    assert lr_at(50, total, base, 0.1) == pytest.approx(0.04)
    assert lr_at(75, total, base, 0.1) == pytest.approx(0.004)


def test_run_spec_validation() -> None:
    assert RunSpec("gn", 2, 0, groups=8).key == "gn-G8-N2-s0"
    assert RunSpec("gn", 32, 1, group_size=4).label == "GN (4 ch/group)"
    with pytest.raises(ValueError, match="gn run takes exactly one of groups"):
        RunSpec("gn", 2, 0)
    with pytest.raises(ValueError, match="only apply to .*gn.*, not bn"):
        RunSpec("bn", 2, 0, groups=8)
    with pytest.raises(ValueError, match="eval_epochs"):
        TrainConfig(epochs=2, eval_epochs=3)


def test_the_gnws_arm_runs_the_shipped_wsconv2d() -> None:
    # The GN+WS arm must train groupnorm.WSConv2d (tested against float64 in test_convert), not
    # a copy of it: every convolution of its model is that class, and no other arm has one.
    from groupnorm.study.data import Dataset
    from groupnorm.study.training import build_model

    x = torch.zeros(4, 3, 8, 8)
    data = Dataset("x", x, torch.zeros(4, dtype=torch.int64), x, x[:, 0, 0, 0].long(), 10)
    cfg = TrainConfig(width=4)
    ws = build_model(RunSpec("gnws", 2, 0, groups=2), cfg, data)
    convs = [m for m in ws.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9 and all(type(m) is WSConv2d for m in convs)
    gn = build_model(RunSpec("gn", 2, 0, groups=2), cfg, data)
    assert not any(isinstance(m, WSConv2d) for m in gn.modules())


def test_reestimated_population_statistics() -> None:
    """Population statistics: running statistics become the average over whole batches of each
    batch's mean and unbiased variance; the per-device setting and momentum are restored."""
    gen = torch.Generator().manual_seed(12)
    bn = PerDeviceBatchNorm2d(3, devices=4)
    model = torch.nn.Sequential(bn)
    x = torch.randn(20, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 0.5
    bn.double()
    reestimate_bn(model, x, torch.device("cpu"), batch=8)  # batches of 8, 8; 4 left out
    xs = x.numpy()[:16]
    batches = [xs[:8], xs[8:]]
    mean = np.mean([b.mean(axis=(0, 2, 3)) for b in batches], axis=0)
    var = np.mean([b.var(axis=(0, 2, 3), ddof=1) for b in batches], axis=0)
    assert_matches(bn.running_mean, mean, torch.float64, what="population mean")
    assert_matches(bn.running_var, var, torch.float64, what="population var")
    assert bn.devices == 4 and bn.momentum == 0.1


def test_a_run_trains_on_its_seeds_draw_and_records_both_bn_evaluations() -> None:
    from groupnorm.study.config import PRESETS, with_overrides
    from groupnorm.study.data import load_dataset
    from groupnorm.study.training import train_run

    cfg = with_overrides(PRESETS["tiny"], train_size=48, val_size=16, test_size=32)
    data = load_dataset(cfg, None)
    assert len(data.train_y) == 48 + 16 - 16 and data.run_size == 48
    train = with_overrides(cfg, train_epochs=2, train_eval_epochs=2).train
    bn = train_run(RunSpec("bn", 4, 0), train, data, torch.device("cpu"))
    gn = train_run(RunSpec("gn", 4, 0, groups=2), train, data, torch.device("cpu"))
    assert bn["train_images"] == gn["train_images"] == 48
    assert len(bn["pop_test_error_per_epoch"]) == len(bn["test_error_per_epoch"]) == 2
    assert "pop_test_error" not in gn
    # Errors on 32 test and 48 training images are multiples of 1/32 and 1/48 of 100 %.
    for rec in (bn, gn):
        assert all((e * 32 / 100).is_integer() for e in rec["test_error_per_epoch"])
        assert all((e * 48 / 100).is_integer() for e in rec["train_error_per_epoch"])
        assert len(rec["running_train_error_per_epoch"]) == 2
        env = rec["environment"]
        assert env["torch"] == torch.__version__
        assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert env["cpu"] and env["machine"]
        assert env["threads"] == str(torch.get_num_threads())
