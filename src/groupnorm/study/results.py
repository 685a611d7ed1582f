"""The study's results file: JSON lines, one finished run per line, appended as each run ends.

Crash safety: a record is serialized first and written with one ``os.write`` of the whole line
(``O_APPEND``), then flushed to disk with ``fsync`` before the run counts as finished. A crash can
leave at most one partial line at the end of the file (no trailing newline); :func:`read_results`
ignores it and :func:`repair` cuts it off before a resumed study appends. A last line that is a
whole record without its newline (cut just before it, or edited by hand) is a record:
:func:`repair` ends it with its newline.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "append_result", "read_results", "repair"]

RESULTS = "results.jsonl"


def _record(line: bytes) -> dict[str, Any] | None:
    """The run record a line holds, or None: a JSON object with the fields the report reads."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not {"key", "spec", "test_error", "train_error"} <= set(
        record
    ):
        return None
    spec = record["spec"]
    if not isinstance(spec, dict) or not {"norm", "batch", "seed"} <= set(spec):
        return None
    return record


def _complete_lines(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records of the whole lines; byte length of those lines). What follows the last newline
    is a torn write and is left out, unless it is a whole record. A newline-terminated line that
    is not a record cannot come from a crash (each line is written whole with its newline), so
    it is an error."""
    good = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for number, line in enumerate(data[:good].splitlines(), 1):
        record = _record(line)
        if record is None:
            raise ValueError(
                f"{path}, line {number}: not a run record ({line[:60]!r}...); the file was "
                "edited or damaged: fix or remove that line (a record is a JSON object with "
                "key, spec (norm, batch, seed), test_error and train_error)"
            )
        records.append(record)
    last = _record(data[good:]) if good < len(data) else None
    if last is not None:
        records.append(last)
        good = len(data)
    return records, good


def read_results(out: Path) -> list[dict[str, Any]]:
    """Every finished run recorded in ``out/results.jsonl`` (a torn last line is ignored)."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    records = _complete_lines(path.read_bytes(), path)[0]
    counts = collections.Counter(r["key"] for r in records)
    twice = sorted(key for key, n in counts.items() if n > 1)
    if twice:
        raise ValueError(
            f"{path} records {', '.join(twice[:5])}{' ...' if len(twice) > 5 else ''} more than "
            "once (two studies wrote to one folder?); a run counted twice would pass for two "
            "seeds: keep one line of each"
        )
    # A run is its spec and split: the same run under another key (an edited line) is a copy.
    runs: dict[str, str] = {}
    for r in records:
        run = json.dumps(
            {**r["spec"], "evaluated_on": r.get("evaluated_on", "test")}, sort_keys=True
        )
        if run in runs:
            raise ValueError(
                f"{path} records one run ({run}) as both {runs[run]} and {r['key']}; a run "
                "counted twice would pass for two seeds: keep one of the lines"
            )
        runs[run] = r["key"]
    return records


def repair(out: Path) -> int:
    """Cut a torn tail (a partial last line) off ``out/results.jsonl``, or end a whole last
    record with its newline; return the bytes removed."""
    path = Path(out) / RESULTS
    if not path.exists():
        return 0
    data = path.read_bytes()
    _, good = _complete_lines(data, path)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    elif data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return len(data) - good


def append_result(out: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line with a single write, then fsync."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(Path(out) / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {RESULTS}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
