"""The project's file habits, in one place: writes that a crash can never leave half done, a JSONL
reader that drops the line a kill tore, and where caches live.

* :func:`atomic_write` (and ``_text`` / ``_json``): write a temporary file beside the target, flush
  and ``fsync`` it, then ``os.replace`` it over the target — a reader sees the old file or the new
  one, never a torn one, whatever moment a crash or ``kill -9`` lands.
* :func:`read_jsonl`: one JSON object per line. An append-only file (``metrics.jsonl``) can end in a
  line torn by a kill mid-write; that last line is dropped. A line that does not parse *before* the
  last is corruption, not a torn write, and raises.
* :func:`cache_dir`: the configured directory, else ``$JSCALE_CACHE``, else ``~/.cache/jscale``.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import IO, Any

CACHE_ENV = "JSCALE_CACHE"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path`` (made with its parents if missing), then
    ``fsync`` and rename it over ``path``; on an error the temporary file is removed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON and a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-blank line (``[]`` if it does not exist). A last line
    that does not parse — torn by a kill mid-write — is dropped; an earlier one raises ``ValueError``
    naming the file and line."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                break  # torn by a kill mid-write
            raise ValueError(f"{path}:{number}: not a JSON line ({e}); the file is corrupt") from None
    return rows


def cache_dir(configured: str | os.PathLike | None = None) -> pathlib.Path:
    """``configured`` (e.g. ``data.cache_dir``), else ``$JSCALE_CACHE``, else ``~/.cache/jscale``."""
    return pathlib.Path(configured or os.environ.get(CACHE_ENV) or "~/.cache/jscale").expanduser()
