"""The study's results file: JSON lines, one finished run per line, appended as each run ends.

Crash safety: a record is serialized first and written with one ``os.write`` of the whole line
(``O_APPEND``), then flushed to disk with ``fsync`` before the run counts as finished. A crash can
leave at most one partial line at the end of the file (no trailing newline); :func:`read_results`
ignores it and :func:`repair` cuts it off before a resumed study appends.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "append_result", "read_results", "repair"]

RESULTS = "results.jsonl"


def _complete_lines(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records of the newline-terminated lines; byte length of those lines). What follows the
    last newline is a torn write and is left out. A terminated line that is not a record cannot
    come from a crash (each line is written whole with its newline), so it is an error."""
    good = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for number, line in enumerate(data[:good].splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "key" not in record:
            raise ValueError(
                f"{path}, line {number}: not a run record ({line[:60]!r}...); the "
                f"file was edited or damaged: fix or remove that line"
            )
        records.append(record)
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
    return records


def repair(out: Path) -> int:
    """Cut a torn tail (a partial last line) off ``out/results.jsonl``; return bytes removed."""
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
