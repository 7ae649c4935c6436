"""Writing outputs atomically: a reader sees the previous output or the new one, never a mix of both.

Every file or directory the library writes goes through here: a run directory's files
(:func:`write_atomic`), a score set, a scored dataset and a report (:func:`write_directory`: filled in
a staging directory beside the target, then renamed into place), and outputs written in shards, one
file per process or partition, each with a completion marker written after it, so that an interrupted
job knows which shards are done and a later step completes the output (:func:`write_shard`,
:func:`shard_status`). What is written gets the permissions an ordinary ``open()`` or ``mkdir()``
would give it (the process umask), not ``mkstemp``/``mkdtemp``'s private ``0o600``/``0o700``.

This module is a leaf: it imports nothing from the package but its error type.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import AccInfError

DONE_SUFFIX = ".done"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def refuse_foreign(target: str | os.PathLike, overwrite: bool, ours: Callable[[Path], bool]) -> Path:
    """Refuse a ``target`` that is a file, or a non-empty directory unless ``overwrite`` and ``ours(target)``."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AccInfError(f"{target} is a file: pass a directory.")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise AccInfError(f"{target} exists and is not empty: choose another directory or pass --overwrite.")
        if not ours(target):
            raise AccInfError(f"{target} was not written by hf_accinf: refusing to replace it; choose another directory.")
    return target


def write_directory(target: str | os.PathLike, fill: Callable[[Path], object], replaces: Iterable[str] | None = None,
                    last: str | None = None) -> Path:
    """Call ``fill(staging)`` on a fresh directory beside ``target``, then move what it wrote into place.

    ``replaces=None``: ``target`` is replaced as a whole (one rename). Otherwise ``target`` keeps its other
    entries: each entry ``fill`` wrote replaces the one of that name (``last`` last, e.g. the file that
    marks the set complete), and the names in ``replaces`` that ``fill`` did not write are removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        fill(staging)
        _honour_umask(staging)
        if replaces is None or not target.is_dir():
            _swap(staging, target)
            return target
        fresh = sorted(path.name for path in staging.iterdir())
        for name in [n for n in fresh if n != last] + [n for n in fresh if n == last]:
            _swap(staging / name, target / name)
        for name in set(replaces) - set(fresh):
            _remove(target / name)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _honour_umask(directory: Path) -> None:
    """Give ``directory`` and what it holds the modes ``mkdir``/``open`` give under the umask (some writers,
    e.g. safetensors, and ``mkdtemp`` create private files)."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, directories, files in os.walk(directory):
        for name in directories:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _swap(source: Path, target: Path) -> None:
    """Move ``source`` onto ``target``; a directory is swapped by renames (the old one removed after)."""
    if target.is_dir() and not target.is_symlink():
        retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
        _remove(retired)
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def shard_name(name: str, index: int, count: int) -> str:
    """``scores.safetensors`` -> ``scores.part-00002-of-00008.safetensors`` (shard 2 of 8)."""
    stem, dot, extension = name.partition(".")
    return f"{stem}.part-{index:05d}-of-{count:05d}{dot}{extension}"


def is_shard(file_name: str, name: str) -> bool:
    """Whether ``file_name`` is a shard of ``name`` or a shard's completion marker."""
    stem, dot, extension = name.partition(".")
    pattern = rf"{re.escape(stem)}\.part-\d+-of-\d+{re.escape(dot + extension)}({re.escape(DONE_SUFFIX)})?"
    return re.fullmatch(pattern, file_name) is not None


def write_shard(directory: str | os.PathLike, name: str, index: int, count: int, write: Callable[[str], object],
                marker: dict | None = None) -> Path:
    """Write shard ``index`` of ``count`` of output ``name`` into ``directory``, then its completion marker
    (``<shard>.done``, JSON ``marker``): a shard without its marker is unfinished and is written again."""
    if not 0 <= index < count:
        raise AccInfError(f"Shard {index} of {count}: the index must lie in [0, {count}).")
    path = Path(directory) / shard_name(name, index, count)
    write_atomic(path, write)
    text = json.dumps({"index": index, "count": count, **(marker or {})})
    write_atomic(path.with_name(path.name + DONE_SUFFIX), lambda tmp: Path(tmp).write_text(text))
    return path


def shard_status(directory: str | os.PathLike, name: str, count: int) -> tuple[dict[int, Path], list[int]]:
    """``({index: path} of finished shards, [indices still to write])`` of output ``name`` split ``count`` ways."""
    directory = Path(directory)
    finished, missing = {}, []
    for index in range(count):
        path = directory / shard_name(name, index, count)
        if path.is_file() and path.with_name(path.name + DONE_SUFFIX).is_file():
            finished[index] = path
        else:
            missing.append(index)
    return finished, missing


def finished_shards(directory: str | os.PathLike, name: str) -> list[tuple[int, int, Path, dict]]:
    """``(index, count, path, marker)`` of every finished shard of output ``name`` in ``directory``, whatever its
    count, in name order (a marker that is not JSON reads as unfinished)."""
    directory = Path(directory)
    found = []
    stem, dot, extension = name.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}\.part-(\d+)-of-(\d+){re.escape(dot + extension)}")
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        match = pattern.fullmatch(path.name)
        marker = path.with_name(path.name + DONE_SUFFIX)
        if match is None or not marker.is_file():
            continue
        try:
            found.append((int(match[1]), int(match[2]), path, json.loads(marker.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return found


def remove_shards(directory: str | os.PathLike, name: str) -> None:
    """Remove every shard of ``name`` (and its marker) from ``directory``."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.iterdir():
            if is_shard(path.name, name):
                path.unlink(missing_ok=True)
