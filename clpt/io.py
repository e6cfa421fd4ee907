"""Atomic file writes: a temporary file in the same folder, then `os.replace`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clpt.errors import ClptError, from_os_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the mode a plain open() gives (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, ClptError) and e.errno is not None:
            raise from_os_error(e, f"cannot write {path}") from None  # nothing half-written is left
        raise


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of a cached file is kept beside it (`NAME.sha256`)."""
    return Path(path).with_name(Path(path).name + ".sha256")


def is_temporary(name: str) -> bool:
    """A name `_atomic` gives its temporary files (`.NAME.XXXXXXXX.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp")


def sweep_temporary(folders) -> list[Path]:
    """Remove the temporary files a killed writer left in `folders` (call it only while no other writer
    can be writing there: under the run's lock); the paths removed."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if is_temporary(e.name) and e.is_file(follow_symlinks=False):
                try:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
                except OSError:
                    pass
    return removed


def write_json(path: Path, obj: Any) -> None:
    _atomic(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def torch_save(path: Path, obj: Any) -> None:
    # Serialised in memory first: torch.save's own writer reports a full disk as a RuntimeError
    # ("unexpected pos"), a plain write reports it as the OSError it is.
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic(Path(path), lambda f: f.write(buf.getbuffer()))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
