"""Atomic writes and run-folder paths.

Every file the pipeline writes goes to a temporary name in the same folder and is renamed into
place, so a crash or a pre-empted pod never leaves a half-written file where a good one was.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator


def _temp_name(path: Path) -> Path:
    """A fresh hidden name next to `path`, for the temporary file or folder renamed onto it.

    Not tempfile.mkstemp/mkdtemp: they create with mode 0600/0700, which the rename keeps, so a merged model
    written by root would be unreadable to another user (a serving container). Creating with 0666/0777 lets the
    kernel apply the umask (and a folder's default ACL) as for any other file, without reading or changing the
    process-wide umask. O_EXCL / mkdir refuse an existing name, so a clash fails instead of overwriting."""
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    return atomic_write_text(path, "".join(lines))


def give_default_modes(folder: Path) -> None:
    """Every file under `folder` gets the mode a file newly created there gets (the umask, a default ACL).

    safetensors writes its files 0600 whatever the umask: a merged model or an adapter written by root would be
    unreadable to another user (a serving container). The mode is learnt from a probe file, without reading or
    changing the process-wide umask."""
    probe = _temp_name(folder / "mode-probe")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = probe.stat().st_mode & 0o777
    finally:
        probe.unlink()
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 != mode:
            os.chmod(file, mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` whole, on error it is removed.

    An earlier folder at `path` stays untouched until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        give_default_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


DISK_ADVICE = ("Free some space (the large files are older runs' merged/ folders and checkpoints/) or write to a "
               "larger disk (on RunPod, the volume under /workspace).")


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds `path`, or would hold it (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_space_problem(path: str | os.PathLike, needed: int, what: str) -> str | None:
    """What to tell the user when the disk of `path` has less than `needed` bytes free; None when it has enough."""
    free = free_disk_bytes(path)
    if free >= needed:
        return None
    return (f"{what} needs about {human_size(needed)} on the disk of {path}, which has {human_size(free)} free. "
            + DISK_ADVICE)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, as an OSError or as safetensors' own error, which carries only the OS message."""
    return getattr(err, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is not JSON
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    records = []
    with path.open(encoding="utf-8-sig") as handle:  # a byte-order mark (Windows editors) is not JSON
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_number}: not valid JSON: {err.msg}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records
