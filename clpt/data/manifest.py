"""The manifest of what a run read: every image, its label, its split and a checksum.

Written to `RUN/manifest.json` when the run is created and checked each time a
stage loads the benchmark, so a changed, missing or added file is reported
instead of silently shifting the split. Two runs, or a run and a paper's split,
are compared by their manifests (`digest` summarises one).

Entries are `[path, label, size, mtime_ns, blake2b]` for files (paths relative
to the dataset root, labels in the dataset's own numbering) and
`[index, label, blake2b]` for in-memory images (CIFAR-100). Verification
re-hashes only files whose size or modification time differ from the record.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

from clpt.errors import DataError

FORMAT = "clpt-manifest-v1"


def _hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decode_problem(data: bytes) -> str | None:
    """Why these bytes are not a usable image, or None. Cheap: JPEGs decode at 1/8 scale (DCT scaling).

    Catches what would otherwise fail deep inside a DataLoader worker: an empty
    file, a file that is not an image, a truncated image.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"more pixels than benchmark.max_image_pixels = {Image.MAX_IMAGE_PIXELS} (raise it to read it)"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", broken chunks
        return (str(e).splitlines() or [type(e).__name__])[0][:80]
    return None


def split_entries(raw_split, root: Path, check: bool = False) -> list[list]:
    if raw_split.images is not None:
        return [
            [i, int(y), _hash_bytes(img.tobytes())]
            for i, (img, y) in enumerate(zip(raw_split.images, raw_split.labels, strict=True))
        ]
    if check:
        _one_label_per_file(raw_split, root)
    out, broken = [], []
    for p, y in zip(raw_split.paths, raw_split.labels, strict=True):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # os.walk's surrogate escapes: JSON records and messages cannot hold it
            raise DataError(
                f"the file name {os.path.relpath(p, root)!r} is not valid UTF-8",
                hint="rename the file (or convert the names with `convmv -f latin1 -t utf8`)",
            ) from None
        try:
            st = os.stat(p)
        except FileNotFoundError:  # listed by the dataset's index files (CUB, Cars) but not there
            broken.append((os.path.relpath(p, root), "missing"))
            continue
        if check:  # one read of each file: its hash and a decode test
            with open(p, "rb") as f:
                data = f.read()
            why = decode_problem(data)
            if why is not None:
                broken.append((os.path.relpath(p, root), why))
            digest_ = _hash_bytes(data)
        else:
            digest_ = _hash_file(p)
        out.append([os.path.relpath(p, root), int(y), st.st_size, st.st_mtime_ns, digest_])
    if broken:
        first, why = broken[0]
        raise DataError(
            f"{len(broken)} image file(s) under {root} cannot be read as images (e.g. {first}: {why})",
            hint="remove or replace the broken files, then create the run again",
        )
    return out


def _one_label_per_file(raw_split, root: Path) -> None:
    """A DataError where one file (after links) is listed under two classes: a link from one class's
    folder into another's would train on the same image under two labels."""
    first: dict[str, tuple[str, int]] = {}
    for p, y in zip(raw_split.paths, raw_split.labels, strict=True):
        real = os.path.realpath(p)
        if real in first and first[real][1] != int(y):
            other = first[real][0]
            raise DataError(
                f"{os.path.relpath(p, root)!r} and {os.path.relpath(other, root)!r} are the same file under two "
                "classes (a link leads one class's folder into another's)",
                hint="remove the link, so each image is read under its own class only",
            )
        first.setdefault(real, (str(p), int(y)))


def build_manifest(raw) -> dict:
    """The manifest of a RawDataset (see clpt.data.readers); every file is checked to decode."""
    splits = {s: split_entries(getattr(raw, s), raw.root, check=True) for s in ("train", "test")}
    return {
        "format": FORMAT,
        "dataset": raw.name,
        "root": str(raw.root),
        "classes": list(raw.class_names),
        "info": dict(raw.info),
        "counts": {s: len(v) for s, v in splits.items()},
        "digest": digest(splits),
        "splits": splits,
    }


def digest(splits: dict) -> str:
    """One checksum over the file list, labels and content hashes (not sizes or times)."""
    h = hashlib.sha256()
    for s in ("train", "test"):
        for e in splits[s]:
            h.update(f"{s}\t{e[0]}\t{e[1]}\t{e[-1]}\n".encode())
    return h.hexdigest()


def stamps(raw, manifest: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """Per split, {path: (size, mtime_ns)} of the files a (verified) manifest records, keyed by the paths
    the reader gives, for `changed_since` checks while the files are read."""
    out = {}
    for s in ("train", "test"):
        rec = {e[0]: (int(e[2]), int(e[3])) for e in manifest["splits"][s] if len(e) == 5}
        paths = getattr(raw, s).paths or []
        out[s] = {p: rec[r] for p in paths if (r := os.path.relpath(p, raw.root)) in rec}
    return out


def changed_since(paths: list[str], recorded: dict[str, tuple[int, int]]) -> None:
    """DataError naming the first of `paths` whose size or modification time now differ from the record
    (a file replaced or rewritten after the run's manifest check, while the run reads it)."""
    for p in paths:
        want = recorded.get(p)
        if want is None:
            continue
        try:
            st = os.stat(p)
        except FileNotFoundError:
            got = None
        else:
            got = (st.st_size, st.st_mtime_ns)
        if got != want:
            raise DataError(
                f"{p!r} changed while the run was reading it ({'removed' if got is None else 'size or time differ'}"
                " from the run's manifest)",
                hint="restore the file as it was and run the same command again (what is done is kept)",
            )


def verify(raw, manifest: dict) -> None:
    """Raise DataError if the dataset on disk differs from the run's manifest."""
    problems = []
    if list(raw.class_names) != manifest["classes"]:
        problems.append("the class list differs")
    for s in ("train", "test"):
        split = getattr(raw, s)
        recorded = manifest["splits"][s]
        if split.images is not None:
            now = split_entries(split, raw.root)
            changed = [str(e[0]) for e, r in zip(now, recorded, strict=False) if e != r]
            if len(now) != len(recorded):
                problems.append(f"{s}: {len(now)} images instead of {len(recorded)}")
            if changed:
                problems.append(f"{s}: {len(changed)} images changed (e.g. index {changed[0]})")
            continue
        current = {
            os.path.relpath(p, raw.root): int(y) for p, y in zip(split.paths, split.labels, strict=True)
        }
        rec = {e[0]: e for e in recorded}
        missing = [p for p in rec if p not in current]
        added = [p for p in current if p not in rec]
        relabeled = [p for p, y in current.items() if p in rec and rec[p][1] != y]
        changed = []
        for p in current:
            if p not in rec:
                continue
            _, _, size, mtime, h = rec[p]
            full = str(raw.root / p)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                missing.append(p)
                continue
            if st.st_size != size or (st.st_mtime_ns != mtime and _hash_file(full) != h):
                changed.append(p)
        for what, items in (
            ("missing", missing),
            ("added", added),
            ("changed", changed),
            ("relabelled", relabeled),
        ):
            if items:
                problems.append(f"{s}: {len(items)} files {what} (e.g. {items[0]})")
    if problems:
        raise DataError(
            f"the dataset under {raw.root} differs from the run's manifest: " + "; ".join(problems),
            hint="restore the files the run was created with, or start a new run on the changed data",
        )
