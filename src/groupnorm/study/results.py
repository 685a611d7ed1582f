"""The study's results file: JSON lines, one finished run per line, appended as each run ends.

Crash safety: a record is serialized first and written with one ``os.write`` of the whole line
(``O_APPEND``), then flushed to disk with ``fsync`` before the run counts as finished. A crash can
leave at most one partial line at the end of the file (no trailing newline or not valid JSON);
:func:`read_results` ignores it and :func:`repair` cuts it off before a resumed study appends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "append_result", "read_results", "repair"]

RESULTS = "results.jsonl"


def _complete_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """(records of the complete, valid lines; byte length of that well-formed prefix)."""
    records: list[dict[str, Any]] = []
    good = 0
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        try:
            record = json.loads(line)
        except ValueError:
            break  # a torn line can only be the last one written: stop here
        if not isinstance(record, dict) or "key" not in record:
            break
        records.append(record)
        pos = good = end + 1
    return records, good


def read_results(out: Path) -> list[dict[str, Any]]:
    """Every finished run recorded in ``out/results.jsonl`` (a torn last line is ignored)."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    return _complete_lines(path.read_bytes())[0]


def repair(out: Path) -> int:
    """Cut a torn tail (a partial last line) off ``out/results.jsonl``; return bytes removed."""
    path = Path(out) / RESULTS
    if not path.exists():
        return 0
    data = path.read_bytes()
    _, good = _complete_lines(data)
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
