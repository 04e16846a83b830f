"""Is a shard folder intact? `prepare.read_meta` and `prepare.load_split` run these before training reads a
token, so a damaged file is named in one sentence instead of failing later as an index error in the packer or
a device-side assert on the GPU. Cheap by design: headers against file sizes, meta.json's keys and counts,
the offsets (which the packer reads in full anyway) in bounded chunks, and the token ids of 64 blocks spread
over the file; the packer's thread then checks every batch's ids (`packing.checked_batch`). No torch import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlmtrain.errors import UserError

CHECK_BLOCK = 1 << 16  # tokens per sampled block; offsets are checked 16x this many at a time


def damaged(file: Path, why: str) -> UserError:
    return UserError(f"{file} is damaged ({why}); run `mlmtrain prepare` again.")


def check_meta(meta, path: Path, splits) -> None:
    """The keys and types every reader of meta.json relies on."""
    if not isinstance(meta, dict):
        raise damaged(path, "not a JSON object")
    ints = ("vocab_size", "max_seq_len", "max_token_id", *(f"{s}.{k}" for s in splits for k in ("sentences", "tokens")))
    bad = [k for k in ints if not isinstance(_dotted(meta, k), int) or isinstance(_dotted(meta, k), bool)]
    bad += [] if meta.get("dtype") in ("uint16", "uint32") else ["dtype"]
    bad += [] if isinstance(meta.get("tokenizer_fingerprint"), str) else ["tokenizer_fingerprint"]
    if bad:
        raise damaged(path, f"{', '.join(bad)} missing or wrong")


def _dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def open_npy(file: Path, dtype: np.dtype) -> np.ndarray:
    """A 1-D .npy of `dtype`, memory-mapped once its header and size agree (a truncated file is named)."""
    if not file.is_file():
        raise UserError(f"{file} is missing; run `mlmtrain prepare` again.")
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, found = read(f)
            start = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise damaged(file, f"not a readable .npy: {e}") from None
    if len(shape) != 1 or found != dtype:
        raise damaged(file, f"holds {found} of shape {shape}, expected one row of {dtype}")
    size, want = file.stat().st_size, start + shape[0] * dtype.itemsize
    if size != want:
        raise damaged(file, f"{size} bytes where its header promises {want}: truncated?")
    return np.memmap(file, dtype=dtype, mode="r", offset=start, shape=shape) if shape[0] else np.zeros(0, dtype)


def check_shard(tokens, offsets, doc_offsets, counts: dict, vocab_size: int, folder: Path) -> None:
    """One split's arrays against meta.json's `counts`, each other, and the vocabulary."""
    if (len(tokens), len(offsets) - 1) != (counts["tokens"], counts["sentences"]):
        raise damaged(folder, f"{len(tokens)} tokens and {len(offsets) - 1} sentences, meta.json says "
                      f"{counts['tokens']} and {counts['sentences']}")  # fmt: skip
    _check_increasing(offsets, len(tokens), folder / "offsets.npy")
    _check_increasing(doc_offsets, len(offsets) - 1, folder / "doc_offsets.npy")
    if len(tokens):
        starts = np.unique(np.linspace(0, max(len(tokens) - CHECK_BLOCK, 0), 64).astype(np.int64))
        biggest = max(int(tokens[s : s + CHECK_BLOCK].max()) for s in starts.tolist())
        if biggest >= vocab_size:
            raise damaged(folder / "tokens.npy", f"token id {biggest} is outside the vocabulary of {vocab_size}")


def _check_increasing(a: np.ndarray, last: int, file: Path) -> None:
    """0, strictly increasing (no empty sentence or document), ending at `last` (the end of what it indexes)."""
    if len(a) == 0 or a[0] != 0 or a[-1] != last:
        raise damaged(file, f"it must run from 0 to {last}")
    step = 16 * CHECK_BLOCK
    for i in range(0, len(a) - 1, step):
        part = np.asarray(a[i : i + step + 1])
        if not (part[1:] > part[:-1]).all():
            raise damaged(file, f"it does not increase after position {i + int(np.argmin(part[1:] > part[:-1]))}")
