"""Is a shard folder intact? `prepare.read_meta` and `prepare.load_split` run these before training reads a
token, so a damaged file is named in one sentence instead of failing later as an index error in the packer or
a device-side assert on the GPU. Cheap by design: headers against file sizes, meta.json's keys and counts,
the offsets (which the packer reads in full anyway) in bounded chunks, and the token ids of 64 blocks spread
over the file; the packer then checks every batch's ids (`packing.BatchStream`). No torch import.
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
    bad = [k for k in ints if not _is_int(_dotted(meta, k))]
    bad += [] if meta.get("dtype") in ("uint16", "uint32") else ["dtype"]
    bad += [] if isinstance(meta.get("tokenizer_fingerprint"), str) else ["tokenizer_fingerprint"]
    bad += ["max_seq_len"] if "max_seq_len" not in bad and meta["max_seq_len"] < 3 else []  # [CLS] token [SEP]
    bad += [] if "vocab_size" in bad or _specials_ok(meta) else ["special_tokens"]
    if bad:
        raise damaged(path, f"{', '.join(bad)} missing or wrong")


def _specials_ok(meta: dict) -> bool:
    """special_tokens (`SpecialTokens.to_dict`; shards made before it have none): five ids and (first, last)
    never-mask ranges, all inside the vocabulary."""
    if "special_tokens" not in meta:
        return True
    specials, vocab_size, names = meta["special_tokens"], meta["vocab_size"], ("pad", "unk", "cls", "sep", "mask")
    if not (isinstance(specials, dict) and set(specials) == {*names, "never_mask"}):
        return False
    ranges = specials["never_mask"]
    if not (isinstance(ranges, list) and all(isinstance(r, list) and len(r) == 2 for r in ranges)):
        return False
    ids = [specials[n] for n in names] + [i for r in ranges for i in r]
    return all(_is_int(i) and 0 <= i < vocab_size for i in ids) and all(first <= last for first, last in ranges)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def open_npy(file: Path, dtype: np.dtype) -> np.ndarray:
    """A 1-D .npy of `dtype`, memory-mapped once its header and size agree (a truncated file is named)."""
    if not file.is_file():
        raise UserError(f"{file} is {'not a file' if file.exists() else 'missing'}; run `mlmtrain prepare` again.")
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


def check_shard(tokens, offsets, doc_offsets, counts: dict, vocab_size: int, max_seq_len: int, folder: Path) -> None:
    """One split's arrays against meta.json's `counts`, `max_seq_len`, each other, and the vocabulary."""
    if (len(tokens), len(offsets) - 1) != (counts["tokens"], counts["sentences"]):
        raise damaged(folder, f"{len(tokens)} tokens and {len(offsets) - 1} sentences, meta.json says "
                      f"{counts['tokens']} and {counts['sentences']}")  # fmt: skip
    longest = _check_increasing(offsets, len(tokens), folder / "offsets.npy")
    if longest > max_seq_len - 2:  # prepare splits every sentence to fit [CLS] and [SEP] around it
        raise damaged(folder, f"a sentence of {longest} tokens, where meta.json's max_seq_len {max_seq_len} leaves "
                      f"room for {max_seq_len - 2}")  # fmt: skip
    _check_increasing(doc_offsets, len(offsets) - 1, folder / "doc_offsets.npy")
    if len(tokens):
        starts = np.unique(np.linspace(0, max(len(tokens) - CHECK_BLOCK, 0), 64).astype(np.int64))
        biggest = max(int(tokens[s : s + CHECK_BLOCK].max()) for s in starts.tolist())
        if biggest >= vocab_size:
            raise damaged(folder / "tokens.npy", f"token id {biggest} is outside the vocabulary of {vocab_size}")


def _check_increasing(a: np.ndarray, last: int, file: Path) -> int:
    """0, strictly increasing (no empty sentence or document), ending at `last` (the end of what it indexes).
    Returns the largest step: the longest sentence (or document)."""
    if len(a) == 0 or a[0] != 0 or a[-1] != last:
        raise damaged(file, f"it must run from 0 to {last}")
    step, longest = 16 * CHECK_BLOCK, 0
    for i in range(0, len(a) - 1, step):
        gaps = np.diff(np.asarray(a[i : i + step + 1]))
        if not (gaps > 0).all():
            raise damaged(file, f"it does not increase after position {i + int(np.argmin(gaps > 0))}")
        longest = max(longest, int(gaps.max()))
    return longest
