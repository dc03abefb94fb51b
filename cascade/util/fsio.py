"""Files cascade writes: never half-written, with the modes `open()` would give, and with the
temporary files of a killed process recognisable and removable.

- `atomic_write_bytes(path, data)`: a temporary file in the same folder, fsync, rename.
- Temporary names are `.<name>.<pid>.<random>.tmp`; `clean_stale_temporaries(folder)` removes
  those whose process is gone (a run killed with -9 never cleans up after itself).
- `FILE_MODE` / `DIR_MODE`: what `open()` / `mkdir()` would give under the current umask
  (`mkstemp` / `mkdtemp` create private 0600 / 0700 entries, wrong for outputs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def temporary_prefix(path: Path) -> str:
    """The prefix of a temporary sibling of `path`: `.<name>.<pid>.` (a random part and `.tmp`
    follow), recognised by `clean_stale_temporaries`."""
    return f".{Path(path).name}.{os.getpid()}."


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so a
    crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary folders and files (`.<name>.<pid>.<random>.tmp`) that a killed
    process left in `folder`; those of live processes are kept. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        parts = p.name.split(".")
        if not (p.name.startswith(".") and p.name.endswith(".tmp") and len(parts) >= 5):
            continue
        try:
            pid = int(parts[-3])
        except ValueError:
            continue
        if _pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
