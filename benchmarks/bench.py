"""GPU benchmark of GroupNorm providers on the shapes of docs/spec.md; as ``groupnorm bench``.

    python benchmarks/bench.py [--shapes VAE] [--layouts nchw,channels_last]
                               [--directions fwd,fwd+bwd] [--providers ours,torch,...]
                               [--reps 50] [--out benchmarks/results]

See :mod:`groupnorm.bench` for the method (L2 flush, CUDA graphs, bytes formula). Exits with
status 2 and a message where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys

from groupnorm import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
