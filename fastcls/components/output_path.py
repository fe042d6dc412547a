"""Where fastcls writes: an `--output` path checked before any work (reading data, loading the model), so that a
mistyped path costs nothing and its error names the flag; and files written whole or not at all."""
import os
import tempfile
from pathlib import Path

from fastcls.errors import ConfigError


def check_writable(path: str | Path, argument: str = "--output", *, folder: bool) -> Path:
    """`path` as a folder (`folder=True`) or a file that fastcls can create or replace; a ConfigError naming
    `argument` otherwise. Nothing is created."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{argument} {path} is a {'file' if folder else 'folder'}, not a "
                          f"{'folder' if folder else 'file'}")
    # the folder to write in: the path itself when it is an existing folder, else its nearest existing ancestor
    # (which must be a folder: a file cannot hold one)
    where = path if folder and path.is_dir() else next(p for p in path.parents if p.exists())
    if not where.is_dir():
        raise ConfigError(f"{argument} {path}: {where} is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"{argument} {path}: cannot write in {where} (permission denied or read-only)")
    return path


def check_output_folder(path: str | Path, overwrite: bool, argument: str = "--output") -> Path:
    """`path` as a folder to write a run or an export into: writable, and new or empty unless `overwrite`."""
    path = check_writable(path, argument, folder=True)
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{argument} {path} is not empty; choose a new or empty folder, or pass --overwrite")
    return path


def atomic_write(path: Path, write) -> None:
    """`write(temporary_path)` beside `path`, synced, then moved over it: an interrupted write leaves the old file
    or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_text_atomic(text: str, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))
