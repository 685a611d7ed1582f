"""The study's models: a small ResNet whose normalization layer is the experimental arm.

Arms (``NORMS``), on an (N, C, H, W) activation:

- ``bn``:  BatchNorm, statistics over (N, H, W) per channel, ``torch.nn.BatchNorm2d``. In the
  paper each GPU normalizes its own N images; :class:`PerDeviceBatchNorm2d` reproduces that in
  one process by splitting a batch of W * N samples into W chunks ("virtual devices").
- ``syncbn``: BatchNorm over the whole batch of every device (``torch.nn.SyncBatchNorm`` when
  run distributed; in one process that is plain BatchNorm over all W * N samples).
- ``gn``:  :class:`groupnorm.GroupNorm` with G groups (statistics over C/G channels and H, W).
- ``ln``:  GroupNorm with G = 1 (LayerNorm over C, H, W).
- ``in``:  GroupNorm with G = C (InstanceNorm).
- ``gnws``: GN with Weight Standardization (:class:`groupnorm.WSConv2d`) on every convolution
  (Qiao et al. 2019).

Every ``bn`` run is also evaluated with population statistics (:func:`reestimate_bn`) instead of
the running averages of small-batch statistics: the same weights, another evaluation.

Initialization follows Wu & He (2018) section 4.1: He (fan-out) init for convolutions, gamma = 1
and beta = 0 everywhere except gamma = 0 on the last norm layer of each residual block, so every
block starts as the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from groupnorm.modules import GroupNorm
from groupnorm.study.config import BATCH_NORMS, NORMS

__all__ = [
    "PerDeviceBatchNorm2d",
    "ResNet",
    "make_norm",
    "reestimate_bn",
    "set_synchronized",
    "set_virtual_devices",
]


class PerDeviceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per chunk of ``devices`` equal chunks.

    For an input of shape (W * N, C, H, W') with ``devices = W``, chunk k (samples k*N .. k*N+N-1)
    is normalized with its own ``mean[k, c]`` and biased ``var[k, c]`` over (N, H, W'), exactly as
    W GPUs running plain BatchNorm on N samples each. The running statistics are updated with the
    average over chunks of each chunk's mean and unbiased variance: that equals the average of W
    replicas' running buffers (the update is linear), which is what the distributed runner
    averages before evaluating. With ``devices = 1``, or in eval mode, this is BatchNorm2d.
    """

    def __init__(self, num_features: int, devices: int = 1, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if self.momentum is None:
            raise ValueError("PerDeviceBatchNorm2d needs an exponential momentum, not None")
        self.devices = devices
        self.synchronized = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        W = self.devices
        if self.training and self.synchronized:
            return self._synchronized(input)
        if not self.training or W == 1:
            return super().forward(input)
        if input.dim() != 4 or input.shape[0] % W:
            raise ValueError(
                f"PerDeviceBatchNorm2d with {W} devices needs a 4-D input whose "
                f"batch is a multiple of {W}, got shape {tuple(input.shape)}"
            )
        B, C, H, Wd = input.shape
        n = B // W
        assert self.momentum is not None
        if n * H * Wd < 2:
            raise ValueError(
                f"BatchNorm needs more than one value per channel per device, got "
                f"{n} sample(s) of {H}x{Wd} per device"
            )
        # Fold the device index into the channels, (W*n, C, L) -> (n, W*C, L), so that torch's
        # native batch_norm computes one statistic per (device, channel): 2-3x faster on CPU
        # than the same math in elementwise ops. Running buffers are replicated per device and
        # averaged back, which is exact because the running-average update is linear.
        x = input.reshape(W, n, C, H * Wd).transpose(0, 1).reshape(n, W * C, H * Wd)
        track = self.training and self.track_running_stats
        running_mean = (
            self.running_mean.repeat(W) if track and self.running_mean is not None else None
        )
        running_var = self.running_var.repeat(W) if track and self.running_var is not None else None
        y = F.batch_norm(
            x,
            running_mean,
            running_var,
            None if self.weight is None else self.weight.repeat(W),
            None if self.bias is None else self.bias.repeat(W),
            True,
            self.momentum,
            self.eps,
        )
        if running_mean is not None and running_var is not None:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(W, C).mean(0))
                self.running_var.copy_(running_var.view(W, C).mean(0))
                self.num_batches_tracked.add_(1)
        return y.reshape(n, W, C, H * Wd).transpose(0, 1).reshape(B, C, H, Wd)

    def _synchronized(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm over the whole batch of every process (SyncBN), any device, gloo or nccl.

        Two passes, each one differentiable all-reduce: the global mean from the per-process
        sums, then the biased variance from the sums of squared deviations from that mean; no
        E[x^2] - E[x]^2 cancellation.
        """
        import torch.distributed as dist

        all_reduce = _AllReduceSum.apply
        C = x.shape[1]
        dims = (0, 2, 3)
        count = torch.tensor(float(x.numel() // C), device=x.device)
        dist.all_reduce(count)
        mean = all_reduce(x.sum(dims)) / count  # (C,)
        var = all_reduce(((x - mean.view(1, C, 1, 1)) ** 2).sum(dims)) / count  # (C,) biased
        y = (x - mean.view(1, C, 1, 1)) * torch.rsqrt(var.view(1, C, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None and self.momentum is not None
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
                self.num_batches_tracked.add_(1)
        return y


class _AllReduceSum(torch.autograd.Function):
    """y = sum over processes of x, on every process. Each process's x feeds every process's
    y, so dL/dx is the sum over processes of dL/dy: the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        g = grad.clone()
        dist.all_reduce(g)
        return g


def make_norm(
    norm: str, num_groups: int | None = None, group_size: int | None = None
) -> Callable[[int], nn.Module]:
    """A factory ``channels -> norm layer`` for the arm ``norm`` (one of :data:`NORMS`).

    ``gn`` takes ``num_groups`` (G) or ``group_size`` (channels per group). As in the paper's
    sweep, a layer narrower than the setting takes the limit: G above C gives G = C there
    (InstanceNorm), channels per group above C give one group (LayerNorm).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm in BATCH_NORMS:
        return lambda c: PerDeviceBatchNorm2d(c)
    if norm == "ln":
        return lambda c: GroupNorm(1, c)
    if norm == "in":
        return lambda c: GroupNorm(c, c)
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"the {norm} arm takes exactly one of num_groups or group_size, got "
            f"num_groups={num_groups}, group_size={group_size}"
        )
    if group_size is not None:
        size = group_size
        return lambda c: GroupNorm(num_channels=c, group_size=min(size, c))
    groups: int = num_groups  # type: ignore[assignment]  # not None: checked above
    return lambda c: GroupNorm(min(groups, c), c)


@torch.no_grad()
def reestimate_bn(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 256
) -> None:
    """Replace every BN layer's running statistics by population statistics: the average over
    the whole batches of ``batch`` images of ``x`` (the training set) of each batch's mean and
    unbiased variance, computed over the full batch (one device). Training-mode outputs do not
    depend on the running statistics."""
    bns = [m for m in model.modules() if isinstance(m, PerDeviceBatchNorm2d)]
    saved = [(m.momentum, m.devices) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # torch's cumulative average over the batches
        m.devices = 1
    was_training = model.training
    model.train()
    whole = len(x) // batch * batch
    for xb in x[: max(whole, min(len(x), batch))].split(batch):
        model(xb.to(device))
    for m, (momentum, devices) in zip(bns, saved, strict=True):
        m.momentum, m.devices = momentum, devices
    model.train(was_training)


def set_virtual_devices(model: nn.Module, devices: int) -> None:
    """Make every :class:`PerDeviceBatchNorm2d` in ``model`` compute statistics per chunk of
    ``devices`` chunks (1 = the whole batch, as BatchNorm2d)."""
    for m in model.modules():
        if isinstance(m, PerDeviceBatchNorm2d):
            m.devices = devices


def set_synchronized(model: nn.Module, synchronized: bool) -> None:
    """Make every :class:`PerDeviceBatchNorm2d` in ``model`` normalize over all processes'
    samples in training (SyncBN; needs torch.distributed initialized) or per process."""
    for m in model.modules():
        if isinstance(m, PerDeviceBatchNorm2d):
            m.synchronized = synchronized


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm (+ projection shortcut) -> relu; the last norm starts at
    gamma = 0 so the block starts as the identity (or its projection)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        norm: Callable[[int], nn.Module],
        conv: type[nn.Conv2d] = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, three stages of ``blocks`` basic blocks at widths
    ``(w, 2w, 4w)`` and strides (1, 2, 2), global average pooling, a linear classifier.

    Input (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(
        self,
        norm: Callable[[int], nn.Module],
        *,
        width: int = 16,
        blocks: int = 1,
        in_channels: int = 3,
        num_classes: int = 10,
        conv: type[nn.Conv2d] = nn.Conv2d,
    ) -> None:
        super().__init__()
        self.stem = conv(in_channels, width, 3, 1, 1, bias=False)
        self.stem_norm = norm(width)
        layers: list[nn.Module] = []
        cin = width
        for stage, stride in enumerate((1, 2, 2)):
            cout = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1, norm, conv))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                norm2 = m.norm2
                assert isinstance(norm2, (nn.BatchNorm2d, nn.GroupNorm))
                nn.init.zeros_(norm2.weight)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))
