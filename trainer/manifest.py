"""Manifests: the size and sha256 of every file of a folder (a checkpoint's manifest.json, an export's
mlmtrain_export.json), so a reader tells a complete folder from a truncated or corrupted one."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (checkpoints and exports can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, names=None) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of the plain files in `folder` (or of `names`), sorted by name."""
    folder = Path(folder)
    names = sorted(names) if names is not None else sorted(p.name for p in folder.iterdir() if p.is_file())
    return {n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def manifest_problems(folder: Path, entries: dict, written: str = "it was written") -> list[str]:
    """What differs between `folder` and the manifest `entries` ({name: {"size", "sha256"}}): missing files,
    other sizes (truncated), other checksums (corrupted). Empty = every listed file is intact. `written` names
    the moment the manifest was made, for the messages ("export", "the checkpoint was saved")."""
    if not isinstance(entries, dict):
        return ["the manifest has no table of files"]
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
