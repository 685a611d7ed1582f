"""ONNX: export time, graph size and onnxruntime inference, ours vs ``nn.GroupNorm``.

The study's ResNet-20 (eval mode, random weights) with every norm ``nn.GroupNorm(8, C)``, our
``GroupNorm(8, C)``, and ours with uneven groups (G=12, which ``nn.GroupNorm`` cannot do),
exported with ``torch.onnx.export(dynamo=True)``. For each: export seconds (the median of
EXPORTS exports, the models taking turns, after a warm-up export of a small model, garbage
collected before each; one export varies by a second or more here), ONNX nodes and bytes, and
onnxruntime CPU inference on a (8, 3, 32, 32) batch, interleaved with the nn.GroupNorm model's
(medians), its output checked against PyTorch's.

    python benchmarks/onnx_export.py [--threads T] [--out benchmarks/results]
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from cpu_standard import save, small_input_args
from torch import nn

import groupnorm
from groupnorm import bench
from groupnorm.study.models import ResNet

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "nn.GroupNorm G=8": lambda c: nn.GroupNorm(8, c),
    "groupnorm G=8": lambda c: groupnorm.GroupNorm(8, c),
    "groupnorm uneven G=12": lambda c: groupnorm.GroupNorm(12, c, uneven=True),
}


def export(model: nn.Module, x: torch.Tensor) -> tuple[bytes, float]:
    # The last export's garbage collected first, untimed: otherwise whichever export happens to
    # trigger the collection of an older one's objects pays for it (about a quarter of a second
    # here, in some exports of a model and not in others).
    gc.collect()
    start = time.perf_counter()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    seconds = time.perf_counter() - start
    assert program is not None
    return program.model_proto.SerializeToString(), seconds


def session(proto: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])


EXPORTS = 3


def run(threads: int) -> list[dict]:
    import onnx

    x = torch.randn(8, 3, 32, 32)
    export(ResNet(lambda c: nn.GroupNorm(1, c), blocks=1).eval(), x)  # warm the exporter
    models = {}
    for name, norm in NORMS.items():
        torch.manual_seed(0)
        models[name] = ResNet(norm, blocks=3).eval()
    times: dict[str, list[float]] = {name: [] for name in NORMS}
    protos: dict[str, bytes] = {}
    for _ in range(EXPORTS):
        for name, model in models.items():
            protos[name], seconds = export(model, x)
            times[name].append(seconds)
    rows, sessions = [], {}
    for name, model in models.items():
        proto, seconds = protos[name], statistics.median(times[name])
        sess = sessions[name] = session(proto, threads)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)
        rows.append(
            {
                "model": f"ResNet-20, {name}",
                "export_s": seconds,
                "export_s_all": times[name],
                "nodes": len(onnx.load_from_string(proto).graph.node),
                "bytes": len(proto),
            }
        )
    feed = x.numpy()
    base = sessions["nn.GroupNorm G=8"]
    for row, sess in zip(rows, sessions.values(), strict=True):
        ours, theirs = bench.time_pair(
            lambda s=sess: s.run(None, {s.get_inputs()[0].name: feed}),
            lambda: base.run(None, {base.get_inputs()[0].name: feed}),
            30,
        )
        row["ort_ms"] = 1e3 * statistics.median(ours)
        row["ort_ms_nn_groupnorm"] = 1e3 * statistics.median(theirs)
        print(
            f"{row['model']:<34} export {row['export_s']:6.2f} s  {row['nodes']:5d} nodes  "
            f"{row['bytes'] / 1e6:6.2f} MB  ort {row['ort_ms']:6.3f} ms "
            f"(nn.GroupNorm {row['ort_ms_nn_groupnorm']:6.3f})",
            flush=True,
        )
    return rows


def main() -> None:
    args = small_input_args(__doc__)
    save(args.out, "onnx_export", run(args.threads))


if __name__ == "__main__":
    main()
