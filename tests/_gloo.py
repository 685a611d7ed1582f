"""Gloo process groups on 127.0.0.1 for the tests that run several real processes."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world: int, port: int, body: Callable[[], None]) -> NoReturn:
    """``body`` in this process as rank ``rank`` of a gloo group of ``world`` ranks on
    127.0.0.1:``port`` (a ``torch.multiprocessing.spawn`` worker), then :func:`exit_now` once
    every rank has reached a barrier. A body that raises tears the group down and re-raises, so
    that spawn reports the error. A collective that waits more than 5 minutes (a rank that
    never joins it) raises instead of holding the test for gloo's default 30."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=5),
    )
    try:
        body()
        dist.barrier()  # no peer still sends when a rank leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_now()


def exit_now() -> NoReturn:
    """Ends a worker process at once with status 0, without tearing gloo down (no destructors
    run): its teardown, in ``destroy_process_group`` or at the interpreter's exit, aborted a rank
    now and then after every rank had finished and saved its results ("terminate called without
    an active exception"; one run in twelve of tests/test_distributed.py on this project's
    machine, with a barrier before ``destroy_process_group``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
