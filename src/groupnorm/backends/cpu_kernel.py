"""The fused CPU kernel (``cpu_kernel.c``): statistics and output of a group norm in two fused
stages, exact at any offset, for NCHW- and channels-last-contiguous inputs, any group plan, and
float32, float64, bfloat16 and float16; and its backward (dx, dweight, dbias) for float32 and
float64.

It is C with no torch headers, built with the machine's C compiler at first use (``-O3
-march=native -fopenmp``, and 32-byte block copies on AVX2 CPUs without AVX-512: _AVX2_FLAGS;
about a second) as a small Python extension module into a per-user
cache keyed by the source, the compiler, the flags, the Python ABI and the CPU, and called with
tensors' data pointers; its OpenMP threads follow ``torch.get_num_threads()``. Where it cannot
be built (no compiler or Python headers), or with ``GROUPNORM_CPU_KERNEL=0``, the torch backend
keeps its composition of torch's ops; :func:`status` says which, and ``groupnorm check`` prints
it.

Statistics (float64, per (sample, group)): blocks of at most 16384 elements, each summed around
a shift near its mean and, where that cancels, a second time around its mean while in cache;
blocks are merged with Chan's formula in a fixed order, so results do not depend on the thread
count. Output: ``y = (x - mean) * A + B`` with the mean as two float32 numbers,
``A = rstd * w * (1 + scale)``, ``B = b * (1 + scale) + shift``, rounded once to y's dtype
(relu applied before rounding). The C file's header has the error analysis.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from groupnorm.activations import triton_code
from groupnorm.backends._kept import plain_tensors
from groupnorm.groups import GroupPlan

__all__ = [
    "activation_backward",
    "activation_forward",
    "backward",
    "forward",
    "forward_plain",
    "fuses_activation",
    "library",
    "serves",
    "stats",
    "status",
    "trusted",
]

_SOURCE = Path(__file__).with_name("cpu_kernel.c")
_NAME = "groupnorm_cpu_kernel"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
# Without AVX-512 the kernel's 8-lane float64 vectors (64 bytes) live in memory, and GCC's
# tuning for AVX2 CPUs copies such blocks in 16-byte pieces that the 32-byte loads of their
# arithmetic read back: each such load waits for a failed store forwarding. Copies in 32-byte
# pieces (GCC 12 and later) forward: the float32 backward took 0.40-0.69x the time, float64
# forwards 0.56-0.89x (AMD EPYC Zen 3, one thread). Dropped where the compiler refuses them.
_AVX2_FLAGS = ("-mmove-max=256", "-mstore-max=256")
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_why_not: list[str] = []


def _cache_dir() -> Path:
    """``$GROUPNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/groupnorm`` (``~/.cache/groupnorm``),
    else, where that cannot be written, a folder of this user's in the temporary directory."""
    given = os.environ.get("GROUPNORM_CACHE_DIR")
    if given:
        return Path(given)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "groupnorm"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0  # Windows has none
    return Path(tempfile.gettempdir()) / f"groupnorm-{uid}"


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native code must not run on a CPU that lacks them)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _flags(cpu_flags: str) -> tuple[str, ...]:
    """The compiler flags for a CPU with these feature flags: _AVX2_FLAGS added where it has
    AVX2 and not AVX-512."""
    features = set(cpu_flags.split())
    if "avx2" in features and "avx512f" not in features:
        return _FLAGS + _AVX2_FLAGS
    return _FLAGS


def _build(source_path: Path = _SOURCE) -> Path:
    """The kernel's extension module built from ``source_path`` (this package's source unless
    given), compiled unless the cache holds it. Raises OSError or
    subprocess.CalledProcessError where it cannot be built."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler: neither $CC nor cc nor gcc is on PATH")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise OSError(f"no Python headers (Python.h) in {include}")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    source = source_path.read_bytes()
    cpu = _cpu_flags()
    flags = _flags(cpu)
    key = repr((cc, flags, include, suffix, platform.machine(), cpu)).encode()
    digest = hashlib.sha256(source + key).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernel-{digest}{suffix}"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed: processes building at once never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        try:
            _compile(cc, flags, include, source_path, tmp)
        except subprocess.CalledProcessError:
            if flags == _FLAGS:
                raise
            _compile(cc, _FLAGS, include, source_path, tmp)  # an older GCC, or clang
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _compile(cc: str, flags: tuple[str, ...], include: str, source: Path, out: str) -> None:
    subprocess.run(
        [cc, *flags, f"-I{include}", str(source), "-o", out],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


# The largest last-level cache that stream_min trusts, whatever sysfs says.
STREAM_LLC_MAX = 32 << 20


def stream_min(caches: list[tuple[int, int]] | None = None) -> int:
    """The smallest output, in bytes, that the kernel stores around the caches (non-temporal
    stores): 3/4 of the last-level cache that CPU 0 shares (glibc's rule for memcpy), read from
    Linux's sysfs and taken as at most ``STREAM_LLC_MAX``; 2^62 (never) where that is unknown.
    sysconf's figure is not used: under a VM it can report the host's whole L3 (320 MB on this
    project's machine, whose CPUs share 32 MB); sysfs can too (480 MB on the Intel Xeon session
    machine), hence the cap.

    Measured on this project's 2-core machine (32 MB L3, the kernel called directly, float32,
    streamed vs cached interleaved), with a consumer that reads y next (SiLU or an add) and
    without: 30 MiB outputs took 0.79-0.92x the time at one thread and 0.86-0.97x at two, both
    layouts; 5-10 MiB ones gained alone at one thread but took 1.0-1.8x as long at two, most
    with the add after. Below the limit y stays in cache for the layer that reads it next. On
    the Intel Xeon machine (``benchmarks/cpu_stream.py``, 2026-12-05), with the residual add
    after, 24-64 MiB outputs took 0.88-0.97x streamed, 4-16 MiB ones 0.99-1.34x: the same 24 MiB
    limit. ``caches``: :func:`_data_caches`, read here unless given."""
    caches = _data_caches() if caches is None else caches
    best = max((size for _, size in caches), default=0)
    return min(best, STREAM_LLC_MAX) // 4 * 3 if best else 1 << 62


FUSED_CL_MIN = 512 << 10


def fused_cl_bytes(caches: list[tuple[int, int]] | None = None) -> int:
    """The largest channels-last sample, in bytes, that one thread normalizes whole while it
    stays in L2 (statistics, then output): half of CPU 0's level-2 cache from sysfs, and at
    least ``FUSED_CL_MIN``, the limit measured on the AMD EPYC machine (1 MB of L2 a core).

    On the Intel Xeon machine (2 MB of L2 a core, so 1 MB here; 2026-12-05,
    ``benchmarks/cpu_fused_cl.py`` and two runs of its draft), 640 KB samples took 0.82-0.98x
    the two-stage path's time in float32 and 0.91-1.07x in half precision, at one and two
    threads, where the 512 KB control moved 0.94-1.02x. ``caches`` as for :func:`stream_min`."""
    caches = _data_caches() if caches is None else caches
    level2 = [size for level, size in caches if level == 2]
    return max(FUSED_CL_MIN, max(level2, default=0) // 2)


def _data_caches() -> list[tuple[int, int]]:
    """(level, bytes) of CPU 0's data and unified caches, from Linux's sysfs (none elsewhere)."""
    found = []
    for index in _CACHES.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            level = (index / "level").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit() and level.isdigit():
            found.append((int(level), int(digits) * scale))
    return found


def _load(path: Path) -> ModuleType:
    """The built module at ``path``, loaded, with this machine's cache limits set."""
    spec = importlib.util.spec_from_file_location(_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    caches = _data_caches()  # sysfs, read once
    module.stream_min(stream_min(caches))
    module.fused_cl_bytes(fused_cl_bytes(caches))
    return module


@cache
def library() -> ModuleType | None:
    """The loaded kernel module, or None where it is switched off or cannot be built
    (:func:`status` says why)."""
    if os.environ.get("GROUPNORM_CPU_KERNEL", "1") == "0":
        _why_not.append("switched off by GROUPNORM_CPU_KERNEL=0")
        return None
    try:
        module = _load(_build())
    except subprocess.CalledProcessError as e:
        _why_not.append(f"the C compiler failed: {e.stderr.strip()[-500:]}")
        return None
    except (OSError, ImportError, subprocess.SubprocessError) as e:
        _why_not.append(f"cannot build or load it: {e}")
        return None
    return module


@cache
def _dtypes() -> frozenset[torch.dtype]:
    lib = library()
    mask = 0 if lib is None else lib.dtypes()
    return frozenset(d for d, code in _CODES.items() if mask >> code & 1)


def status() -> str:
    """One line: whether the kernel is in use, or why not."""
    if library() is not None:
        return "fused CPU kernel: built and in use"
    return f"fused CPU kernel: not in use ({_why_not[-1]}); torch's ops serve the CPU instead"


def layout(x: torch.Tensor) -> int | None:
    """0 for NCHW-contiguous x (N, C, *S), 1 for channels-last-contiguous x (as (N, *S, C)),
    None for any other layout. Strides of size-1 dimensions do not matter to the kernel."""
    if x.is_contiguous():
        return 0
    return 1 if _channels_last(x) else None


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x (N, C, *S) is channels-last-contiguous, as (N, *S, C)."""
    # A 4-D or 5-D tensor's own flag, where torch keeps one (it too skips size-1 dimensions):
    # movedim is a dispatched op, 25-30 us on the first call after a large kernel has pushed
    # the dispatcher's tables out of cache (the forward of a (2, 320, 64, 64) float32 tensor;
    # this project's CPU machine).
    dim = x.dim()
    if dim in _FORMATS:
        return x.is_contiguous(memory_format=_FORMATS[dim])
    return dim > 2 and x.movedim(1, -1).is_contiguous()


_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def serves(x: torch.Tensor) -> bool:
    """Whether the kernel can run on x: built, a non-empty CPU tensor of a float dtype in a
    layout it reads (:func:`layout`). The caller makes sure autograd records nothing."""
    return (
        x.is_cpu
        and library() is not None
        and x.dtype in _dtypes()
        and x.numel() > 0
        and layout(x) is not None
    )


def _plan_arrays(plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's offsets (G + 1) and channel groups (C) as int64 tensors, kept with the plan."""
    kept = plan.index_cache.get(_NAME)
    if kept is None:
        with plain_tensors():
            kept = plan.index_cache[_NAME] = (
                torch.tensor(plan.offsets, dtype=torch.int64, device="cpu"),
                torch.tensor(plan.channel_group, dtype=torch.int64, device="cpu"),
            )
    return kept  # type: ignore[return-value]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _code(t: torch.Tensor | None) -> int:
    return 0 if t is None else _CODES[t.dtype]


def _shape(x: torch.Tensor) -> tuple[int, int, int]:
    N, C = x.shape[:2]
    return N, C, x.numel() // (N * C)


def stats(x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """float64 (3, N, G): each (sample, group)'s mean, biased variance and the mean's low part
    (:func:`low_part`) of x, which :func:`serves` accepts."""
    lib = library()
    assert lib is not None
    N, C, L = _shape(x)
    off, _ = _plan_arrays(plan)
    out = torch.empty((3, N, plan.num_groups), dtype=torch.float64, device="cpu")
    lib.stats(
        x.data_ptr(), _CODES[x.dtype], N, C, L, layout(x), off.data_ptr(), plan.num_groups,
        *_moment_pointers(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


def forward_plain(
    x: torch.Tensor,
    shape: torch.Size,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    relu: bool,
) -> torch.Tensor | None:
    """:func:`forward`'s y with nothing but weight, bias and relu, or None where the kernel is
    not built or does not read x's layout or dtype (the hot path of a module call: checks its
    caller has made are not made again, and x's shape comes from it, as fetching it costs
    more than the rest of these lines)."""
    lib = library()
    cl = layout(x)
    numel = x.numel()
    if lib is None or cl is None or not numel:
        return None
    N, C = shape[0], shape[1]
    off, group_of = _plan_arrays(plan)
    y = torch.empty_like(x)
    code = _CODES[x.dtype]
    # _ptr and _code written out: each call costs a few us after a large kernel (cold caches).
    # A dtype this build lacks (float16 without _Float16) returns -1.
    failed = lib.forward(
        x.data_ptr(), code, y.data_ptr(), code, N, C, numel // (N * C), cl, off.data_ptr(),
        plan.num_groups, group_of.data_ptr(), 0, 0, 0, 0, eps,
        0 if weight is None else weight.data_ptr(), 0 if weight is None else _CODES[weight.dtype],
        0 if bias is None else bias.data_ptr(), 0 if bias is None else _CODES[bias.dtype],
        0, 0, relu, torch.get_num_threads(),
    )  # fmt: skip
    return None if failed else y


def forward(
    x: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    relu: bool = False,
    out_dtype: torch.dtype | None = None,
    moments: torch.Tensor | None = None,
    want_moments: bool = False,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, moments)`` for x (N, C, *S) that :func:`serves` accepts: y in x's memory format and
    ``out_dtype`` (x's dtype, or float32 for a half x whose epilogue follows); moments the
    float64 (3, N, G) mean, variance and the mean's low part used (:func:`low_part`): those
    given (contiguous; (2, N, G): no low part), else computed (None unless ``want_moments``).

    weight and bias: (C,) contiguous CPU tensors of any float dtype; scale and shift: (N, C)
    float64 contiguous."""
    lib = library()
    assert lib is not None
    N, C, L = _shape(x)
    G = plan.num_groups
    off, group_of = _plan_arrays(plan)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    y = torch.empty_like(x, dtype=out_dtype)
    given = moments is not None
    if moments is None and want_moments:
        moments = torch.empty((3, N, G), dtype=torch.float64, device="cpu")
    mean, var, lo = _moment_pointers(moments)
    code = lib.forward(
        x.data_ptr(), _CODES[x.dtype], y.data_ptr(), _CODES[out_dtype], N, C, L, layout(x),
        off.data_ptr(), G, group_of.data_ptr(), mean, var, lo, given, eps, _ptr(weight),
        _code(weight), _ptr(bias), _code(bias), _ptr(scale), _ptr(shift), relu,
        torch.get_num_threads(),
    )  # fmt: skip
    if code:
        raise RuntimeError(f"cpu_kernel: unsupported dtypes {x.dtype} -> {out_dtype}")
    return y, moments


def _moment_pointers(moments: torch.Tensor | None) -> tuple[int, int, int]:
    """Addresses of the mean, variance and low-part rows of (2 or 3, N, G) moments (0 for
    none), by arithmetic: indexing makes a view per row."""
    if moments is None:
        return 0, 0, 0
    mean, row = moments.data_ptr(), moments.stride(0) * 8
    return mean, mean + row, mean + 2 * row if moments.shape[0] == 3 else 0


def low_part(hi: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(s, lo)`` with ``s + lo == hi + rest`` exactly, s the float64 sum (Knuth's
    TwoSum): a mean as pivot plus the mean relative to it, as the kernel keeps it. One float64
    number alone is off by up to half an ulp of the pivot, which in xhat is ``|mean| rstd /
    2^53`` (1e-10 at a float64 mean of 1e4 and std of 1e-2)."""
    hi, rest = hi.double(), rest.double()
    s = hi + rest
    back = s - hi
    return s, (hi - (s - back)) + (rest - back)


def trusted(mean: torch.Tensor, rstd: torch.Tensor, limit: float) -> bool | None:
    """Whether every element has ``|mean * rstd| <= limit`` (in float64; a NaN fails), for
    contiguous CPU tensors of one float dtype and shape; None where the kernel is not built or
    cannot read them."""
    lib = library()
    dtype = mean.dtype
    if (
        lib is None
        or dtype not in _dtypes()
        or rstd.dtype is not dtype
        or not (mean.is_contiguous() and rstd.is_contiguous())
        or mean.shape != rstd.shape
        or not (mean.is_cpu and rstd.is_cpu)
    ):
        return None
    return bool(lib.trusted(mean.data_ptr(), rstd.data_ptr(), _CODES[dtype], mean.numel(), limit))


def activation_forward(u: torch.Tensor, activation: str) -> torch.Tensor | None:
    """``act(u)`` for float32 CPU u in a layout the kernel reads, SiLU or GELU, in float64 and
    rounded once to float32, in u's layout; None where the kernel does not serve it (not
    built, another dtype, layout or activation)."""
    return _activation(None, u, activation)


def activation_backward(dy: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor | None:
    """``dy * act'(u)`` for the u that :func:`activation_forward` serves: the derivative and the
    product in float64, rounded once to float32, in u's layout; None where it does not."""
    return _activation(dy, u, activation)


def fuses_activation(x: torch.Tensor, activation: str | None) -> bool:
    """Whether :func:`backward` takes ``activation``'s derivative itself for this x (which
    :func:`serves`): SiLU or GELU on float32."""
    return activation in _ACT_CODES and x.dtype is torch.float32


def _activation(dy: torch.Tensor | None, u: torch.Tensor, activation: str) -> torch.Tensor | None:
    lib = library()
    code = _ACT_CODES.get(activation)
    if (
        code is None
        or lib is None
        or u.dtype is not torch.float32
        or not u.is_cpu
        or u.numel() == 0
        or layout(u) is None
    ):
        return None
    out = torch.empty_like(u)
    if dy is not None and (dy.dtype is not u.dtype or dy.stride() != u.stride()):
        dy = torch.empty_like(u).copy_(dy)  # u's strides: the kernel walks both in memory order
    lib.activation(_ptr(dy), u.data_ptr(), out.data_ptr(), code, u.numel(), torch.get_num_threads())
    return out


_ACT_CODES = {name: triton_code(name) for name in ("silu", "gelu")}


def _to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of NCHW-contiguous float32/float64 t in channels-last strides (t's shape)."""
    lib = library()
    assert lib is not None
    N, C, L = _shape(t)
    out = t.new_empty((t.shape[0], *t.shape[2:], C)).movedim(-1, 1)
    lib.to_channels_last(
        t.data_ptr(), out.data_ptr(), N, C, L, t.element_size(), torch.get_num_threads()
    )
    return out


def backward(
    x: torch.Tensor,
    dy: torch.Tensor,
    plan: GroupPlan,
    weight: torch.Tensor | None,
    moments: torch.Tensor,
    eps: float,
    *,
    per_sample: bool = False,
    stats_grads: torch.Tensor | None = None,
    stats_given: bool = False,
    sums_dtype: torch.dtype = torch.float64,
    activation: str | None = None,
    u_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)`` of ``y = GN(x) * weight + bias`` for float32/float64 x that
    :func:`serves` accepts and the float64 ``moments`` (2 or 3, N, G) its forward used (as
    :func:`forward` returns them): dx in x's
    dtype and layout; dw and db (C,), the sums of dy * xhat and of dy per channel, summed in
    float64 and stored as ``sums_dtype`` (float64 or float32: a float32 weight's gradients
    without a conversion after), each its own tensor (autograd accumulates a view of a shared
    one into ``.grad`` by copying it).

    ``per_sample``: weight is float64 (N, C) contiguous, a weight per sample and channel
    (``weight[c] * (1 + scale[n, c])`` of a modulated forward), and dw and db are float64
    (N, C), the sums of dy * xhat and of dy per sample and channel.

    ``stats_grads``: float64 (2, N, G) contiguous, (a, b): what reaches x through statistics the
    forward returned, ``a (x - mean) + b`` on every element of group (n, g) (a = 2 dL/dm2, b =
    dL/dmean / count), added to dx in the same pass. ``stats_given``: the forward normalized with
    given statistics, constants to this backward: dx = rstd * dy * weight (their own gradients
    follow from the sums).

    ``activation`` (SiLU or GELU where :func:`fuses_activation`): the forward's output was
    act(u), ``u = xhat * weight + u_bias`` (u_bias float64 contiguous, (C,), or (N, C) where
    ``per_sample``; None for 0), and dy is the gradient of act(u): the kernel first forms
    ``dy act'(u)`` in float64, u recomputed from x in float64, rounded once to float32, and
    goes on with that as dy. (The forward's float32 u is rounded from float32 arithmetic; its
    error, carried through act'', put dweight past the float32 bound.)"""
    lib = library()
    assert lib is not None
    N, C, L = _shape(x)
    cl = layout(x)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)  # held here: a temporary's data pointer would outlive it
    if cl == 0:
        if not dy.is_contiguous():
            dy = dy.contiguous()
    elif not _channels_last(dy):
        dy = _to_channels_last(dy.contiguous())
    off, group_of = _plan_arrays(plan)
    dx = torch.empty_like(x)
    shape = (N, C) if per_sample else (C,)
    dw, db = (torch.empty(shape, dtype=sums_dtype, device="cpu") for _ in range(2))
    mean, var, lo = _moment_pointers(moments)
    sa = sb = 0
    if stats_grads is not None:
        sa = stats_grads.data_ptr()
        sb = sa + stats_grads.stride(0) * 8
    code = lib.backward(
        x.data_ptr(), dy.data_ptr(), dx.data_ptr(), _CODES[x.dtype], N, C, L, cl,
        off.data_ptr(), plan.num_groups, group_of.data_ptr(), mean, var, lo, eps,
        _ptr(weight), _code(weight), dw.data_ptr(),
        db.data_ptr(), _CODES[sums_dtype], sa, sb, stats_given, torch.get_num_threads(),
        per_sample, 0 if activation is None else _ACT_CODES[activation], _ptr(u_bias),
    )  # fmt: skip
    if code:
        raise RuntimeError(f"cpu_kernel: no backward for {x.dtype} with {sums_dtype} sums")
    return dx, dw, db
