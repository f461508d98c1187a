"""Writing output files: checked before the work starts, published in one rename when it is done.

Every file quantkit writes (ONNX models, OpenVINO IR, CLI checkpoints) goes through here: a temporary file beside
the target is written, flushed to disk, given the permissions a new file gets from the umask, and renamed over the
target -- a reader never sees a partial file and a failure leaves nothing behind. Errors are
:class:`~quantkit.errors.ExportError` naming the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from .errors import ExportError

T = TypeVar("T")


class OutputExistsError(ExportError, FileExistsError):
    """The output file exists and the caller asked not to replace it."""


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_output_path(path: str | os.PathLike) -> Path:
    """Raise ExportError unless ``path`` names a file in an existing, writable folder; returns it as a Path."""
    p = Path(path)
    folder = _folder(p)
    if p.is_dir():
        raise ExportError(f"output path {str(p)!r} is a folder; give a file name such as model.onnx")
    if not folder.is_dir():
        why = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ExportError(f"cannot write {str(p)!r}: folder {str(folder)!r} {why}")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems all show here
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"cannot write {str(p)!r}: folder {str(folder)!r} is not writable "
                          f"({exc.strerror or exc})") from exc
    return p


def new_file_mode() -> int:
    """The permission bits a newly created file gets from the process umask (0o666 & ~umask), as ``open()`` would
    give it (``mkstemp`` always creates 0o600)."""
    mask = None
    try:  # Linux: read it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish_file(path: str | os.PathLike, write: Callable[[Path], T], *, replace: bool = True) -> T:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then make it ``path`` in one rename, with the
    permissions the umask gives new files. ``replace=False`` never replaces a file that exists when the work is
    done (checked without a race: a hard link fails if the name exists), raising :class:`OutputExistsError`. On any
    failure nothing is left behind. Returns what ``write`` returned."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=_folder(path))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = write(tmp)
        os.chmod(tmp, new_file_mode())
        if replace:
            os.replace(tmp, path)
            return result
        if os.path.lexists(path):
            raise OutputExistsError(f"{str(path)!r} exists; it was not replaced")
        try:
            os.link(tmp, path)  # fails if ``path`` exists: no check-then-write race
        except FileExistsError:
            raise OutputExistsError(f"{str(path)!r} exists; it was not replaced") from None
        except OSError:  # a file system without hard links
            if os.path.lexists(path):
                raise OutputExistsError(f"{str(path)!r} exists; it was not replaced") from None
            os.replace(tmp, path)
        return result
    except OutputExistsError:
        raise
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` as ``path`` through :func:`publish_file` (never a partial file)."""
    publish_file(path, lambda tmp: write_synced(tmp, data), replace=replace)


def temporary_folder_beside(path: Path) -> Path:
    """A new empty folder beside ``path`` (same file system, so its files can be renamed onto ``path``); the caller
    removes it."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".tmp", dir=_folder(path)))
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


def fsync_file(path: Path) -> None:
    """Flush a file someone else wrote (e.g. a library's save function) to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def publish_together(moves: list[tuple[Path, Path]], scratch: Path) -> None:
    """Rename each ``(temporary file, target)`` in order (targets that belong together, such as an OpenVINO
    ``.bin`` and its ``.xml``: the file that points to the others goes last). If a rename fails, the targets
    already replaced get their previous files back (kept in the folder ``scratch`` meanwhile, which must be on the
    same file system) or are removed; then the error is raised."""
    done: list[tuple[Path, Path | None]] = []
    try:
        for i, (src, dst) in enumerate(moves):
            backup = None
            if os.path.lexists(dst):
                backup = scratch / f"previous.{i}"
                os.replace(dst, backup)
            done.append((dst, backup))
            os.replace(src, dst)
    except BaseException:
        for dst, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, dst)
                else:
                    os.unlink(dst)
            except OSError:
                pass
        raise


__all__ = ["check_output_path", "new_file_mode", "write_synced", "publish_file", "atomic_write_bytes",
           "temporary_folder_beside", "fsync_file", "publish_together", "OutputExistsError"]
