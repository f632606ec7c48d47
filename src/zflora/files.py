"""Writing files atomically: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

STALE_S = 3600  # a temporary file or directory this old belongs to a writer that was killed


def remove_stale(paths: Iterable[Path], age_s: float = STALE_S) -> None:
    """Remove temporary files or directories left by killed writers: only those older than `age_s`, so a
    concurrent writer's file in flight (each writer's temporary name is its own) is left alone."""
    for p in paths:
        try:
            if time.time() - p.stat().st_mtime <= age_s:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        except FileNotFoundError:
            pass


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def apply_umask(root: Path) -> None:
    """Give a tree made by mkdtemp/mkstemp (private modes) the modes the user's umask gives new files."""
    umask = current_umask()
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def writer_lock(path: str | os.PathLike) -> FileLock:
    """A lock that one writer of `path` holds at a time, across threads and processes of this machine: for
    a write of several files that belong together. Its lock file lives in the temp directory, not in `path`."""
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    user = os.getuid() if hasattr(os, "getuid") else "user"  # /tmp is shared; Windows' temp dir is the user's
    folder = Path(tempfile.gettempdir()) / f"zflora-locks-{user}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return FileLock(folder / f"{key}.lock")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = current_umask()
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else (not UTF-8, not JSON, nested too deeply, a list)
    raises `error` naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
