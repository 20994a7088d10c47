"""File I/O every layer shares: atomic writes and the one JSONL reader.

Atomic writes: every store the package keeps (checkpoints, run state, system state, reports) goes through
``atomic_write_*``, so a killed process leaves either the old file or the whole new one, never a torn one.

JSONL: ``iter_jsonl`` reads one JSON value a line (blank lines skipped, ``.gz`` decompressed) for the run's data
files, the example data sets, HumanEval and the reward engine's pair files; each caller adds its own checks
(an object, its fields) and its own error class around the ``JSONLineError`` that names the file and line.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path`: temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class JSONLineError(ValueError):
    """A line of a JSONL file that is not JSON: ``"FILE line N: not valid JSON (MESSAGE at column C)"``."""

    def __init__(self, path: str | os.PathLike, line: int, msg: str, column: int):
        self.path, self.line, self.msg, self.column = os.fspath(path), line, msg, column
        super().__init__(f"{self.path} line {line}: not valid JSON ({msg} at column {column})")


def iter_jsonl(path: str | os.PathLike, *, bad_lines: str = "raise") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file (``.gz``: gzip-compressed).

    A line that is not JSON raises ``JSONLineError`` (``bad_lines="raise"``), or is yielded as a
    ``JSONLineError`` in its value's place (``bad_lines="yield"``: lenient readers skip and count it). A file
    that cannot be opened raises the OSError of ``open``.
    """
    if bad_lines not in ("raise", "yield"):
        raise ValueError(f"bad_lines must be 'raise' or 'yield', got {bad_lines!r}")
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                err = JSONLineError(path, n, exc.msg, exc.colno)
                if bad_lines == "raise":
                    raise err from None
                value = err
            yield n, value
