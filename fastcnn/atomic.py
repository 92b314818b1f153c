"""Writing files so that nothing is lost: a temporary file beside the destination, renamed into
place only when complete, with the permissions ``open(path, "wb")`` would give.

Temporary names carry the writer's process id (``.<name>.<pid>.<random><suffix>``), so a later
write to the same folder can remove the ones whose writer died (``kill -9``, a power cut) without
touching those of a writer still running.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path


def resolve(path) -> Path:
    """Where writing ``path`` really lands: a symbolic link's target (the link stays a link)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_destination(path, what="file") -> Path:
    """Fail now, with a message naming the path, if ``path`` cannot be written later: a missing
    folder, a folder in its place, no permission. Returns the resolved destination."""
    target = resolve(path)
    folder = target.parent
    if target.is_dir():
        raise IsADirectoryError(f"cannot write the {what} to {path}: it is a folder; give a "
                                f"file name")
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write the {what} to {path}: the folder {folder} {why}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the {what} to {path}: no permission to write in "
                              f"{folder}")
    return target


def _umask() -> int:
    try:  # Linux 4.7+: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """The old file's mode when replacing one, else what the umask gives a new file."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot ask about): leave it
    return True


def remove_stale(folder, name, suffix) -> list[Path]:
    """Remove the temporary files for ``name`` in ``folder`` whose writing process is gone;
    returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[^.]+{re.escape(suffix)}\Z")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def temporary_beside(path, suffix=".tmp"):
    """Yield ``(file object, temporary path)`` beside ``path``'s real destination; on success the
    caller renames it with ``commit``; on any failure, or if not committed, it is removed."""
    target = resolve(path)
    remove_stale(target.parent, target.name, suffix)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.",
                               suffix=suffix)
    try:
        os.fchmod(fd, _mode_for(target))
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def commit(f, tmp: Path, path) -> None:
    """Flush ``f`` to disk and rename ``tmp`` over ``path``'s real destination."""
    target = resolve(path)
    f.flush()
    os.fsync(f.fileno())
    os.replace(tmp, target)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dirfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it to ``path``
    (through a symbolic link, to its target). A failure leaves the old file as it was."""
    with temporary_beside(path) as (f, tmp):
        write(f)
        commit(f, tmp, path)
