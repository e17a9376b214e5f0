"""Atomic file and folder writes: a reader sees the old content or the whole new one, never a part.

Standard library only, so every layer of the package can use it, ``lora/`` (torch and safetensors only) included.
Everything is built beside its target (same folder, same file system) and moved into place with one
``os.replace``, which POSIX makes atomic; on any failure the temporary file or folder is removed. ``tempfile``
makes its files 0600 and folders 0700 (as safetensors does its files); what is written here gets the modes a plain
``open``/``mkdir`` would give under the user's umask before it is moved into place, so a serving account can read
an export as it could any other file the user wrote.
"""

from __future__ import annotations

import hashlib
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
        os.chmod(temporary, 0o666 & ~current_umask())
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
        apply_umask(staging)
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


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files and folders.

    ``tempfile`` makes 0700 folders, and some writers (safetensors among them) make 0600 files whatever the umask.
    """
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for parent, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(parent, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: POSIX has no call that only reads it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
