"""Writing folders safely, once for every command.

- A folder is built under a hidden temporary sibling and renamed into place (`atomic_dir`), so a reader sees
  the old folder or the complete new one, never half of one; a write that fails (disk full, read-only
  filesystem, no permission) removes the temporary folder and says, in one sentence, what is intact.
- Every folder mlmtrain makes holds a marker, `.mlmtrain.json`: which command made it (its `Layout`), with
  which version. A command replaces or deletes only a folder of its own kind, holding only files it writes
  (`check_out_folder`); anything else is refused. Folders made before markers existed are recognised only by
  their exact set of files.
- Temporary siblings are named `.tmp_{name}_{host}_{pid}` (a folder being written) and
  `.mlmtrain-old_{name}_{host}_{pid}` (a complete folder moved aside to be replaced), so a later start can tell
  which ones a killed process left behind and what each one is (`remove_stale_tmp`). A sibling inside a
  folder is that folder's own only as the temporary of a name its command writes there (`owns_name`).
- Manifests (size + sha256 of every file: manifest.py) let a reader tell a complete folder from a damaged one.

No torch import.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from mlmtrain.errors import UserError
from mlmtrain.stop import signals_deferred

# a run's checkpoint folder and a checkpoint's manifest (trainer/checkpoint.py writes them): named here, so the
# commands that only recognise a run (prepare, tokenizer) never import torch
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"

# a write the system refused (full disk, quota, read-only filesystem, permissions): said in one sentence
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# hidden siblings: `.tmp_{name}_{host}_{pid}` (being written), `.mlmtrain-old_{name}_{host}_{pid}` (moved aside)
TMP_PREFIX, OLD_PREFIX = ".tmp_", ".mlmtrain-old_"
LOCK = ".mlmtrain.lock"  # flock-ed by the process that trains (or runs a demo) in the folder (run_folder.RunLock)
MARKER = ".mlmtrain.json"  # {"kind", "made_by", "mlmtrain_version", "created"} in every folder mlmtrain makes
# the host has no "_" (`_host`), so the last two fields are host and pid and the name is all before them
_TMP_NAME = re.compile(r"\.(?P<kind>tmp|mlmtrain-old)_(?P<name>.+)_(?P<host>[A-Za-z0-9.-]+)_(?P<pid>\d+)")
TMP = "{tmp}"  # in a Layout's `owns`: a name component that is one of the hidden siblings above


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: written to a temporary sibling, then renamed, so a full disk or a
    kill leaves the previous file, never a truncated one."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) all at once (`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    """Pretty UTF-8 JSON (Hangul stays readable), newline-terminated, replacing `path` all at once."""
    write_text(path, json_text(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def json_text(obj, **dumps_args) -> str:
    """Strict JSON: a non-finite float (a diverged loss, an overflowed gradient norm) is null, since NaN and
    Infinity are not JSON and strict readers (JavaScript, Go, serde) refuse the whole file over one."""
    return json.dumps(_finite(obj), allow_nan=False, **dumps_args)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def file_mode() -> int:
    """The mode a new plain file gets under this process's umask (0644 under the usual 022). Writers that
    create their files private (safetensors: 0600) get it back with os.chmod where the files are for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------- ownership


@dataclass(frozen=True)
class Layout:
    """A kind of folder an mlmtrain command makes, and which files in it are that command's own."""

    kind: str  # the marker's "kind": tokenizer | shards | run | export | demo | bench
    what: str  # for messages: "a tokenizer", "token shards", ...
    command: str  # what makes it: "mlmtrain prepare"
    owns: tuple[str, ...]  # patterns of the files the command writes, relative: `owned` says how they match
    legacy: tuple[str, ...]  # files a folder without a marker (an older mlmtrain's) must hold to be this kind
    parts: tuple[tuple[str, Layout], ...] = ()  # subfolders that are folders of another kind (the demo's)
    # (a JSON file of `legacy`, keys it must have): a file named like ours is not ours unless it reads as ours
    legacy_json: tuple[str, tuple[str, ...]] | None = None


def owned(path: str, pattern: str) -> bool:
    """Does the relative file `path` ("a/b/c") match `pattern`, name by name? Each name is an fnmatch pattern
    that stays within one name (`*` never spans `/`), or TMP (a hidden sibling mlmtrain writes through); a
    last name `**` matches everything below."""
    names, parts = path.split("/"), pattern.split("/")
    if parts[-1] == "**":
        parts = parts[:-1]
        names = names[: len(parts)] if len(names) > len(parts) else []
    if len(names) != len(parts):
        return False
    return all(_TMP_NAME.fullmatch(n) if p == TMP else fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts))


def owns_name(layout: Layout, parents: list[str], name: str) -> bool:
    """Does `layout` own `name` in its folder `parents` ([] for its root; hidden siblings already read as the
    names they stand for): its marker, a part's folder or a name in it, a name one of its patterns gives there,
    or anything below a `**`? A hidden sibling is ours only as the temporary copy of such a name."""
    parts = dict(layout.parts)
    if parents and parents[0] in parts:
        return owns_name(parts[parents[0]], parents[1:], name)
    if not parents and (name == MARKER or name in parts):
        return True
    names = [*parents, name]
    for pattern in (p.split("/") for p in layout.owns):
        for depth, (n, p) in enumerate(zip(names, pattern)):
            if p == "**":
                return True
            if p == TMP or not fnmatch.fnmatchcase(n, p):
                break
            if depth == len(names) - 1:
                return True
    return False


def _siblings_owned(layout: Layout, path: str) -> bool:
    """Every hidden sibling along `path` stands for a name `layout` owns there (a user's `.tmp_notes_v_2` is not
    ours, however it is named); below one, names are matched as in the folder it stands for."""
    resolved = []
    for n in path.split("/"):
        match = _TMP_NAME.fullmatch(n)
        if match is not None and not owns_name(layout, resolved, match["name"]):
            return False
        resolved.append(n if match is None else match["name"])
    return True


def reads_as(path: Path, keys: tuple[str, ...]) -> bool:
    """Is `path` a JSON object holding every one of `keys`?"""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder`, or None without one. An unreadable marker reads as a foreign one."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    return marker if isinstance(marker, dict) else {"made_by": f"an unknown program (unreadable {MARKER})"}


def write_marker(folder: Path, layout: Layout) -> None:
    from mlmtrain import __version__

    marker = {"kind": layout.kind, "made_by": layout.command, "mlmtrain_version": __version__}
    write_json(Path(folder) / MARKER, {**marker, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def folder_state(folder: Path, layout: Layout) -> tuple[str, str]:
    """(state, made_by) of `folder` for a command that writes `layout`: "absent", "empty", "file", "mine" (its
    marker, or an older mlmtrain's folder holding exactly this kind's files), "other" (another mlmtrain
    command's marker; made_by names it) or "foreign" (anything else that is not empty)."""
    folder = Path(folder)
    if not folder.exists():
        return "absent", ""
    if not folder.is_dir():
        return "file", ""
    if not any(folder.iterdir()):
        return "empty", ""
    marker = read_marker(folder)
    if marker is not None:
        return ("mine", layout.command) if marker.get("kind") == layout.kind else ("other", marker.get("made_by"))
    legacy = all((folder / name).is_file() for name in layout.legacy) and not foreign_files(folder, layout)
    if legacy and (layout.legacy_json is None or reads_as(folder / layout.legacy_json[0], layout.legacy_json[1])):
        return "mine", layout.command
    return "foreign", ""


def foreign_files(folder: Path, layout: Layout) -> list[str]:
    """Files under `folder` that `layout`'s command does not write (relative paths, a whole foreign subfolder
    as "name/", an empty one too): what replacing or deleting the folder would lose. A subfolder that cannot be
    listed is foreign (what it holds is unknown). Symbolic links are never followed."""
    folder, parts, foreign = Path(folder), dict(layout.parts), []

    def unreadable(error: OSError) -> None:
        foreign.append(os.path.relpath(error.filename, folder).replace(os.sep, "/") + "/")

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        rel = Path(root).relative_to(folder)
        if rel == Path("."):
            for name in [d for d in dirs if d in parts]:
                dirs.remove(name)
                if folder_state(folder / name, parts[name])[0] in ("mine", "empty"):
                    foreign += [f"{name}/{f}" for f in foreign_files(folder / name, parts[name])]
                else:
                    foreign.append(f"{name}/")
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        for name in [d for d in dirs if d not in links and not _dir_owned(layout, (rel / d).as_posix())]:
            dirs.remove(name)  # a folder the command makes no file in: the user's, empty or not
            foreign.append(f"{(rel / name).as_posix()}/")
        for name in files + links:
            path = (rel / name).as_posix()
            if path != MARKER and not (any(owned(path, p) for p in layout.owns) and _siblings_owned(layout, path)):
                foreign.append(path)
    return sorted(foreign)


def _dir_owned(layout: Layout, path: str) -> bool:
    """Is the relative folder `path` one `layout` writes files in (a hidden sibling read as the name it stands
    for)?"""
    resolved = []
    for n in path.split("/"):
        match = _TMP_NAME.fullmatch(n)
        name = n if match is None else match["name"]
        if not owns_name(layout, resolved, name):
            return False
        resolved.append(name)
    return True


def holder_of(fd: int) -> str:
    """What the lock file open as `fd` says of the process holding it."""
    return os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "it has not said who it is yet"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock, or None if no process does. Only looks: a shared lock, taken and
    dropped at once, conflicts with the holder's exclusive one (and needs no write access, even over NFS)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_of(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def refuse_unless_mine(folder: Path, layout: Layout, state: str, made_by, flag: str = "--out") -> None:
    """One sentence for a folder `layout.command` may not write (a file, another command's folder, or one
    mlmtrain did not make), from `folder_state`; nothing for one of its own."""
    if state == "file":
        raise UserError(f"{flag} {folder} is a file, not a folder.")
    if state == "other":
        raise UserError(f"{flag} {folder} was made by `{made_by}`, not `{layout.command}`: choose another {flag}.")
    if state == "foreign":
        raise UserError(
            f"{flag} {folder} is not empty and was not made by `{layout.command}`: choose a new or empty folder."
        )


def check_out_folder(
    folder, layout: Layout, *, replace: bool, flag="--out", replace_flag="--overwrite", renamed: bool = True
) -> bool:
    """May a command that writes `layout` write `folder`? Yes if it is absent or empty (returns False), or
    holds this kind, made by mlmtrain, with nothing else in it, and `replace` is set (returns True: it will be
    replaced). Everything else is refused with one sentence; a folder mlmtrain did not make never gets a
    suggestion to force it. `renamed`: the command writes `folder` by renaming a new one into its place
    (`atomic_dir`), so it cannot be the current folder."""
    folder = Path(folder)
    if renamed and os.path.abspath(folder) == os.getcwd():  # written by a rename: away under the shell in it
        raise UserError(f"{flag} {str(folder) or '.'} is the current folder: pass a folder in it, e.g. {flag} out.")
    if renamed and os.path.ismount(folder):  # (a docker -v volume): no folder can be renamed into its place
        raise UserError(f"{flag} {folder} is a mount point: pass a folder in it, e.g. {flag} {Path(folder) / 'out'}.")
    if folder.is_symlink():  # a rename into place (or a delete) would act on the link, not where it points
        raise UserError(
            f"{flag} {folder} is a symbolic link: pass the folder it points to, {os.path.realpath(folder)}."
        )
    state, made_by = folder_state(folder, layout)
    if state in ("absent", "empty"):
        return False
    refuse_unless_mine(folder, layout, state, made_by, flag)
    if not replace:
        raise UserError(
            f"{folder} already holds {layout.what}: choose another {flag}, or pass {replace_flag} to replace it."
        )
    extra = foreign_files(folder, layout)
    if extra:
        names = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UserError(
            f"{folder} holds {layout.what} and also files `{layout.command}` did not write ({names}); nothing was "
            f"replaced: move those files out, or choose another {flag}."
        )
    return True


# ---------------------------------------------------------------------------------------------------- temporary


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def tmp_sibling(final: Path, old: bool = False) -> Path:
    """The hidden sibling this process writes `final` through (or, `old`, moves the previous `final` to)."""
    return final.parent / f"{OLD_PREFIX if old else TMP_PREFIX}{final.name}_{_host()}_{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Best effort: a cleanup that fails (a read-only filesystem) must not hide the error that called it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def remove_stale_tmp(parent: Path, name: str | None = None, *, any_host: bool = False, owns=None) -> list[str]:
    """Clean up the temporary siblings (of `name` only, if given; of names `owns(name)` accepts, if given) that
    killed processes left in `parent`: a half-written one is removed; a complete folder moved aside to be replaced
    (`.mlmtrain-old_`) is put back when nothing took its place. A process still alive on this host keeps its own;
    with `any_host` (the caller holds the folder's lock, so no other process writes there) every other one is
    stale. Returns what was done."""
    done: list[str] = []
    if not Path(parent).is_dir():
        return done
    for entry in sorted(Path(parent).iterdir()):
        match = _TMP_NAME.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name) or (owns and not owns(match["name"])):
            continue
        same_host, pid = match["host"] == _host(), int(match["pid"])
        if (same_host and pid == os.getpid()) or (not any_host and (not same_host or _alive(pid))):
            continue
        final = entry.parent / match["name"]
        if match["kind"] == "mlmtrain-old" and not final.exists():
            os.replace(entry, final)
            done.append(f"put back {final}, which a killed process had moved aside")
        elif match["name"].endswith("_old") and _complete(entry):  # an older mlmtrain's .tmp_X_old_HOST_PID
            # was a complete X moved aside; since .mlmtrain-old_ it reads as X_old half written: never deleted
            done.append(f"left {entry}: an older mlmtrain may have moved {match['name'][:-4]} aside there")
        else:
            _remove(entry)
            done.append(f"removed {entry}, left by a killed process")
    return done


def _complete(folder: Path) -> bool:
    """A folder mlmtrain finished writing: its marker, or a checkpoint's manifest.json, is written last."""
    return folder.is_dir() and ((folder / MARKER).is_file() or (folder / MANIFEST).is_file())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(e: BaseException) -> str | None:
    """What a failed write says in words ("No space left on device"), or None for an error that is not one."""
    if isinstance(e, SafetensorError):  # "...: I/O error: No space left on device (os error 28)", or older
        # 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        found = re.search(r'message: "([^"]*)"|error: ([^:]+?) \(os error \d+\)', str(e))
        return (found.group(1) or found.group(2)) if found else str(e)
    if isinstance(e, OSError):
        where = Path(e.filename) if e.filename else None
        while where is not None and TMP_PREFIX in str(where):  # name the folder it was written into instead
            where = where.parent
        return f"{e.strerror or e}" + (f" ({where})" if where else "")
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`, or None when it is absent: a folder renamed into its place is another one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def atomic_dir(
    final: str | Path, *, replace: bool = False, layout: Layout | None = None, kept: str | None = None
) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to write into; when the block ends without an error, fsync
    it and rename it into place. `final` may be absent or an empty folder; with `replace`, an existing `final`
    is moved aside and deleted only after the new folder is in place. With `layout`, `final` must pass
    `check_out_folder` (at the start, and again just before the rename) and the folder gets its marker.

    On any error (or a signal's exception) the temporary folder is removed and `final` is untouched; a write
    that fails (disk full, read-only filesystem, no permission) becomes a UserError naming `final` and `kept`,
    what is intact (by default the previous `final`, or nothing)."""
    final = Path(final)
    kept = kept or (f"the previous {final} is unchanged" if final.exists() else "nothing was left behind")
    tmp = None
    try:
        if layout is not None:
            check_out_folder(final, layout, replace=replace)
        final.parent.mkdir(parents=True, exist_ok=True)
        # said as given, renamed by its parent's real path: `tok/../tok` would stop resolving once tok moves aside
        target = Path(os.path.realpath(final.parent)) / final.name
        before = _identity(target)  # what is there now: it must still be there when the new folder replaces it
        remove_stale_tmp(target.parent, target.name)
        tmp = tmp_sibling(target)
        _remove(tmp)
        tmp.mkdir()
        yield tmp
        if layout is not None:
            write_marker(tmp, layout)
        for root, _, names in os.walk(tmp):
            for n in names:
                fsync_path(Path(root) / n)
            fsync_path(Path(root))
        if layout is not None:
            check_out_folder(final, layout, replace=replace)  # nothing appeared there meanwhile
        if before is not None and _identity(target) not in (None, before):  # another process put its own there
            raise UserError(f"{final} was replaced by another process while this one wrote it; it was left as it is.")
        # a command's output (not a checkpoint: the loop answers stops itself): no stop between the renames
        with signals_deferred(f"{final} was put in place" if layout is not None else None):
            old = None
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            elif target.exists():
                if not replace or before is None:  # another process's, made since the start: never replaced
                    raise UserError(f"{final} appeared while it was being written; it was left as it is.")
                old = tmp_sibling(target, old=True)
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:  # a failed write, or a signal's exception between the two renames
                if old is not None:
                    os.replace(old, target)
                raise
            tmp = None
            fsync_path(target.parent)
            if old is not None:
                _remove(old)
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not write {final}: {write_failure(e)}; {kept}") from None
    finally:
        if tmp is not None:
            _remove(tmp)
