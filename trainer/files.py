"""Writing folders safely, once for every command: a folder is built under a hidden temporary sibling and
renamed into place, so a reader sees the old folder or the complete new one, never half of one; manifests
(size + sha256 of every file) let a reader tell a complete folder from a damaged one. No torch import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp_"  # hidden temporary siblings: `.tmp_{name}_{pid}`


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (checkpoints and exports can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj) -> None:
    """Pretty UTF-8 JSON (Hangul stays readable), newline-terminated."""
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def file_mode() -> int:
    """The mode a new plain file gets under this process's umask (0644 under the usual 022). Writers that
    create their files private (safetensors: 0600) get it back with os.chmod where the files are for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def file_entries(folder: Path, names=None) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of the plain files in `folder` (or of `names`), sorted by name."""
    folder = Path(folder)
    names = sorted(names) if names is not None else sorted(p.name for p in folder.iterdir() if p.is_file())
    return {n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def manifest_problems(folder: Path, entries: dict, written: str = "it was written") -> list[str]:
    """What differs between `folder` and the manifest `entries` ({name: {"size", "sha256"}}): missing files,
    other sizes (truncated), other checksums (corrupted). Empty = every listed file is intact. `written` names
    the moment the manifest was made, for the messages ("export", "the checkpoint was saved")."""
    problems = []
    for name, entry in entries.items():
        path = Path(folder) / name
        if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
            problems.append(f"the manifest entry for {name} lacks size or sha256")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(
                f"{name} is {path.stat().st_size} bytes but the manifest says {entry['size']} "
                f"(truncated, or changed after {written}?)"
            )
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256 checksum (corrupted, or changed after {written}?)")
    return problems


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_sibling(final: Path) -> Path:
    return final.parent / f"{TMP_PREFIX}{final.name}_{os.getpid()}"


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to write into; when the block ends without an error, fsync
    it and rename it into place. `final` may be absent or an empty folder; with `replace`, an existing `final`
    is moved aside and deleted only after the new folder is in place. On any error (or a signal's exception)
    the temporary folder is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        old = None
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        elif final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            old = final.parent / f"{TMP_PREFIX}{final.name}_old_{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
