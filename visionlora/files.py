"""Atomic file and folder writes: a reader sees the old content or the whole new one, never a part.

Standard library only, so every layer of the package can use it, ``lora/`` (torch and safetensors only) included.
Everything is built beside its target (same folder, same file system) and moved into place with one
``os.replace``, which POSIX makes atomic; on any failure the temporary file or folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The parent folder is created if needed; on failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON with a trailing newline to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def staged_folder(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``target`` to build in; moved to ``target`` when the block ends without error.

    Args:
        target: Where the finished folder goes; its parent is created if needed.
        replace: Replace an existing ``target``, only once the new folder is complete; else an existing
            ``target`` is left as it is and FileExistsError raised.

    On any error in the block the staging folder is removed and ``target`` is as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        publish_folder(staging, target, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_folder(staging: Path, target: Path, replace: bool = False) -> None:
    """Move the finished ``staging`` folder to ``target``; an existing ``target`` goes only once that succeeded."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not replace:
        raise FileExistsError(f"{target} exists; nothing was replaced")
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, retired / target.name)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(retired / target.name, target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)
