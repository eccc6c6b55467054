"""Writing output files so that nothing half-written is ever left behind.

Every output goes to a temporary name beside its target and is renamed into place when
complete. The temporaries that exist at any moment are registered here, so that an
interrupted command (see `cli`) can remove them before it exits. Output paths are
checked before any work starts (`check_output_file`), and files get the permissions the
umask gives, as `open` would (a temporary file's private mode does not survive).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InvalidArgument, MsrnnError

_LOCK = threading.Lock()
_PENDING: set[Path] = set()


def check_output_file(path, param: str | None = None, suffix: str | None = None) -> Path:
    """`path` as a Path if a file can be written there: its folder exists and is writable,
    and it is not a folder itself (and ends with `suffix`, if given)."""
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise InvalidArgument(f"{param or 'the output'} must name a {suffix} file, got {path}", param)
    if p.is_dir():
        raise MsrnnError(f"{path} is a folder, not a file", param)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise MsrnnError(f"folder does not exist: {parent}", param)
    if not os.access(parent, os.W_OK):
        raise MsrnnError(f"folder is not writable: {parent}", param)
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temporary(path: Path) -> Iterator[Path]:
    """Register `path` (a temporary file or folder) while the block runs; remove it if the
    block fails."""
    with _LOCK:
        _PENDING.add(path)
    try:
        yield path
    except BaseException:
        remove(path)
        raise
    finally:
        with _LOCK:
            _PENDING.discard(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_pending() -> None:
    """Remove every temporary still registered (an interrupted command's last act)."""
    with _LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
    for p in pending:
        remove(p)


def temp_folder(target: Path) -> Path:
    """A new, empty temporary folder beside `target` (register it with `temporary`)."""
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o777 & ~_umask())
    return tmp


def write_atomic(path, write: Callable, binary: bool = False) -> Path:
    """Write `path` through `write(file)`: to a temporary beside it, renamed into place
    when complete, with the umask's permissions."""
    path = check_output_file(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with temporary(Path(name)) as tmp:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    return path
