"""`mlmtrain upload`: publish an exported folder to the Hugging Face Hub in one command.

Check the flags (the repo id, the branch name, no token in any of them) before reading anything, then that the
folder is a complete export (`export_check.check_export_folder`, which `mlmtrain export` runs too:
every file's size and sha256 recomputed against the manifest, regular files only, no symbolic links, no names
that would be patterns), copy it into a private temporary folder and check the copy again (what is sent is
what was checked, even if the export changes meanwhile: an editor, an `export --overwrite`), load the copy
with transformers (`export.verify_export`: the manifest's "verified" is a claim anyone can edit), create the
repo if missing, create the branch if missing (`--create-pr`: look for an open pull request of the user's that
already holds the files), then one `upload_folder` commit of the copy that sends exactly the files
`mlmtrain_export.json` lists (never the manifest itself, checkpoints, optimizer states or strays). Re-running is
safe: the Hub reports which files it already has and unchanged files are skipped, so a second run makes no new
commit, and a second `--create-pr` run opens no second pull request.

Only `huggingface_hub` calls that are stable from 0.30 to 2.x are used (`HfApi.create_repo`,
`create_branch`, `upload_folder`, `repo_info`, `whoami`, `get_token`, and for `--create-pr`
`get_repo_discussions` and `get_paths_info`: a re-run finds its own open pull request with the same files and
opens no second one). The token comes from `HF_TOKEN`,
the saved login, or `--token-file`; never from a plain argument, and it is never printed or written here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from mlmtrain import __version__
from mlmtrain.errors import TOKEN_LIKE, UserError, refuse_tokens, require
from mlmtrain.export_check import EXPORT_MANIFEST, card_header, check_export_folder, read_manifest
from mlmtrain.files import MARKER, json_text
from mlmtrain.progress import bars_enabled

TOKENS_URL = "https://huggingface.co/settings/tokens"


def _branch_name(name: str) -> bool:
    """A name git takes for a branch, conservatively (no '..', '//', trailing '/', '.' or '.lock')."""
    plain = re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._/-]*", name) is not None
    return plain and ".." not in name and "//" not in name and not name.endswith(("/", ".", ".lock"))


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    require("transformers", "upload (it loads the export before sending it)", "transformers", "hf")  # before hashing
    if args.token is not None:
        raise UserError(
            "a token is not accepted on the command line (it would stay in shell history and process "
            "lists): set HF_TOKEN, run `hf auth login`, or pass --token-file PATH"
        )
    refuse_tokens(repo_id=args.repo_id, revision=args.revision, commit_message=args.commit_message)
    _check_repo_id(args.repo_id)  # the flags first: an export of BERT-large is 1.3 GB to hash
    if args.create_pr and args.revision not in (None, "main"):
        raise UserError("--create-pr opens a pull request against main; it cannot be combined with --revision")
    if args.revision is not None and not _branch_name(args.revision):
        raise UserError(f"--revision {args.revision!r} is not a branch name (letters, digits, '-', '_', '.', '/')")
    folder = Path(args.folder)
    if folder.is_dir() and not (folder / EXPORT_MANIFEST).is_file():  # not an export at all: one sentence
        raise UserError(
            f"{folder} is not an export of `mlmtrain export` (no {EXPORT_MANIFEST}); nothing was sent: export a "
            f"checkpoint first (`mlmtrain export --checkpoint RUN --out DIR`) and upload DIR."
        )
    problems = check_export_folder(folder)
    if not problems and read_manifest(folder).get("verified") is not True:
        problems.append(f"{EXPORT_MANIFEST} says the export was not verified by loading it with transformers")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"{folder} is not a complete, verified export; nothing was sent:\n{listing}")
    manifest = read_manifest(folder)
    files = sorted(manifest["files"])
    name = manifest.get("name")
    if isinstance(name, str) and "/" in name and name != args.repo_id:
        raise UserError(
            f"{folder} was exported for {name} (its model card's title and usage snippet name it), not "
            f"{args.repo_id}: export again with --name {args.repo_id}, or upload with --repo-id {name}"
        )
    message = args.commit_message or default_commit_message(manifest)
    token, source = resolve_token(args.token_file)
    if args.dry_run:
        with private_copy(folder, files) as copy:
            verify_again(copy, folder)
        plan = upload_plan(folder, files, args, message, source)
        print(json_text(plan, indent=2, ensure_ascii=False) if args.json else plan_text(plan, folder))
        return 0
    if token is None:
        raise UserError(
            f"no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token-file PATH "
            f"(make a token with write access at {TOKENS_URL})"
        )
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    if not bars_enabled():
        disable_progress_bars()  # its tqdm bars would draw `\r` updates into a log
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub will not connect; unset it to upload"
        )
    with private_copy(folder, files) as copy:
        verify_again(copy, folder)
        try:
            info = _upload(copy, files, args, message, token)
        except UserError as e:
            raise UserError(str(e).replace(token, "***")) from None  # never echo the token, even inside a message
    model_url = f"{constants.ENDPOINT}/{args.repo_id}"
    if args.revision not in (None, "main"):
        model_url += f"/tree/{args.revision}"
    pr_url, reused = getattr(info, "pr_url", None), getattr(info, "reused", False)
    if args.json:  # for scripts: one object on stdout, the same facts as the lines below
        result = {
            "schema": "mlmtrain.upload/1",  # a change of any key's meaning changes it
            "dry_run": False,
            "repo_id": args.repo_id,
            "revision": None if pr_url else args.revision or "main",
            "url": None if pr_url else model_url,
            "pull_request": pr_url,
            "pull_request_reused": reused,
            "commit": info.oid,
            "files": files,
        }
        print(json_text(result, indent=2, ensure_ascii=False))
        return 0
    if reused:
        print(f"done: the {len(files)} files of the export are already in your open pull request #{info.pr_num} "
              f"against {args.repo_id}'s main; no new one was opened")  # fmt: skip
        print(f"pull request: {pr_url}")
    elif pr_url:
        print(f"done: the {len(files)} files of the export are in a pull request against {args.repo_id}'s main")
        print(f"pull request: {pr_url}")
    else:
        print(f"done: the {len(files)} files of the export are on {args.repo_id}")  # or already were: no commit
        print(f"model:  {model_url}")
    print(f"commit: {info.oid}")
    return 0


@contextlib.contextmanager
def private_copy(folder: Path, files: list[str]):
    """The listed files and the manifest copied into a new private folder (mode 0700, under TMPDIR) and checked
    there: what is verified and sent cannot change under the upload. Regular files only, never through a link."""
    names = [*files, EXPORT_MANIFEST]
    with tempfile.TemporaryDirectory(prefix="mlmtrain_upload_") as tmp:
        copy = Path(tmp)
        try:
            for name in names:
                fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                with os.fdopen(fd, "rb") as src:
                    if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                        raise UserError(f"{folder / name} is not a regular file; nothing was sent")
                    with open(copy / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as e:
            need = _human(sum(os.stat(folder / n).st_size for n in names if (folder / n).is_file()))
            raise UserError(
                f"could not copy {folder / name} into a private folder under {tempfile.gettempdir()} before sending "
                f"it ({e.strerror or e}); the copy needs {need}: set TMPDIR to a folder with room"
            ) from None
        problems = check_export_folder(copy)
        if problems or sorted(read_manifest(copy)["files"]) != files:
            raise UserError(f"{folder} changed while it was being read; nothing was sent: run the command again")
        yield copy


def verify_again(folder: Path, shown: Path) -> None:
    """Load the folder (the private copy of `shown`) with transformers as `mlmtrain export` did (keys, logits
    against ours, tokenizer, fill-mask on the card's widget texts): what is sent has passed it, whatever the
    manifest says."""
    import yaml

    from mlmtrain.export import verify_export

    widgets = (yaml.safe_load(card_header(folder / "README.md") or "") or {}).get("widget") or []
    texts = [w["text"] for w in widgets if isinstance(w, dict) and "[MASK]" in str(w.get("text"))]
    try:
        verify_export(folder, texts or ["[MASK]"])
    except UserError as e:
        message = str(e).replace(str(folder), str(shown))
        raise UserError(
            f"{shown} does not pass verification with transformers again; nothing was sent: {message}"
        ) from None


def default_commit_message(manifest: dict) -> str:
    """Names the run (its folder name only: a local path has no place in a public commit) and the step."""
    run = Path(manifest["run"]).name if manifest.get("run") else None
    step = manifest.get("step")
    what = " at ".join(x for x in (run, None if step is None else f"step {step}") if x) or "model"
    return f"Upload {what} (mlmtrain {manifest.get('mlmtrain_version') or __version__})"


def resolve_token(token_file: str | None) -> tuple[str | None, str]:
    """(token, where it came from). Order: --token-file, then huggingface_hub's own (HF_TOKEN, saved login)."""
    if token_file is not None:
        path = Path(token_file)
        if TOKEN_LIKE.search(token_file) and not path.exists():  # said without echoing it
            raise UserError(
                "--token-file takes the path of a file holding the token, and this looks like the token itself "
                "(it would stay in shell history and process lists): write it to a file, or set HF_TOKEN"
            )
        if not path.is_file():
            raise UserError(f"--token-file {path} {'is not a file' if path.exists() else 'does not exist'}")
        try:
            token = path.read_text(encoding="utf-8-sig").strip()  # a byte-order mark (Windows editors) dropped
        except UnicodeDecodeError:
            raise UserError(f"--token-file {path} is not UTF-8 text: it must hold exactly one token") from None
        if not token or len(token.split()) != 1:
            raise UserError(f"--token-file {path} must hold exactly one token")
        if not re.fullmatch(r"[\x21-\x7e]+", token):  # said without echoing it
            raise UserError(f"--token-file {path} holds characters a token cannot have (a token is printable ASCII)")
        return token, f"--token-file {path}"
    from huggingface_hub import get_token

    token = get_token()
    env = next((name for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if os.environ.get(name)), None)
    source = env or "the saved login (`hf auth login`)"
    return token, source if token else "none found"


def _check_repo_id(repo_id: str) -> None:
    part = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
    if not re.fullmatch(f"{part}/{part}", repo_id) or "--" in repo_id or ".." in repo_id:
        raise UserError(
            f"--repo-id {repo_id!r} is not NAME/REPO (letters, digits, '-', '_', '.'; "
            "NAME is your user name or an organization)"
        )


def upload_plan(folder: Path, files: list[str], args, message: str, token_source: str) -> dict:
    """What a run would do (`--dry-run`), as `--json` prints it."""
    strays = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and str(p.relative_to(folder)) not in files and p.name != MARKER
    )
    return {
        "schema": "mlmtrain.upload/1",
        "dry_run": True,
        "repo_id": args.repo_id,
        "private": args.private,
        "revision": None if args.create_pr else args.revision or "main",
        "create_pr": args.create_pr,
        "commit_message": message,
        "token": token_source,  # where it would come from, never the token
        "files": {name: (folder / name).stat().st_size for name in files},
        "not_sent": strays,
    }


def plan_text(plan: dict, folder: Path) -> str:
    """The dry run's plan for a person, with the model card header it would publish."""
    if plan["create_pr"]:
        revision = "a pull request against main"
    elif plan["revision"] == "main":
        revision = "main"
    else:
        revision = f"{plan['revision']} (branch created from main if missing)"
    sizes, strays = plan["files"], plan["not_sent"]
    lines = [
        "dry run: nothing is sent",
        f"repo:       {plan['repo_id']} (model repo, created if missing, {'private' if plan['private'] else 'public'})",
        f"revision:   {revision}",
        f"commit:     {plan['commit_message']}",
        f"token:      {plan['token']}",
        "checked:    every file's size and sha256; loaded again with transformers (keys, logits, fill-mask)",
        f"files:      {len(sizes)}, {_human(sum(sizes.values()))}",
        *(f"  {size:>13,}  {name}" for name, size in sizes.items()),
    ]
    if strays:
        lines.append(
            f"not sent:   {', '.join(strays[:10])}" + (f" and {len(strays) - 10} more" if len(strays) > 10 else "")
        )
    header = (card_header(folder / "README.md") or "").splitlines()
    return "\n".join([*lines, "model card header:", "  ---", *(f"  {line}" for line in header), "  ---"])


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _upload(folder: Path, files: list[str], args, message: str, token: str):
    """the card's metadata check -> create_repo -> (visibility check) -> create_branch -> (--create-pr: an open
    pull request with these files) -> upload_folder, each error turned into one sentence."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    step = "validate"
    try:
        # The Hub checks README.md's YAML (license, language, ...) itself, and upload_folder asks it only after
        # create_repo: asked first, a card it refuses leaves no empty repo behind. Private, but in 0.30 to 2.x.
        api._validate_yaml((folder / "README.md").read_text(encoding="utf-8"), repo_type="model", token=token)
        step = "create"
        api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
        if args.private:
            step = "info"
            if not api.repo_info(args.repo_id, repo_type="model").private:
                raise UserError(
                    f"{args.repo_id} already exists and is public; --private does not change an "
                    "existing repo (make it private on the Hub first, or drop --private)"
                )
        if args.revision not in (None, "main"):
            step = "branch"
            api.create_branch(args.repo_id, branch=args.revision, repo_type="model", exist_ok=True)
        if args.create_pr:  # a re-run (a lost reply, a script's retry) opens no second pull request
            step = "prs"
            pr = open_pull_request_with(api, args.repo_id, folder, files)
            if pr is not None:
                head = api.repo_info(args.repo_id, repo_type="model", revision=pr.git_reference).sha
                return SimpleNamespace(oid=head, pr_url=pr.url, pr_num=pr.num, reused=True)
        step = "upload"
        return api.upload_folder(
            repo_id=args.repo_id,
            folder_path=folder,
            repo_type="model",
            allow_patterns=files,
            commit_message=message,
            revision=args.revision,
            create_pr=args.create_pr or None,
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every library error becomes one sentence, or is re-raised as a bug
        sentence = explain_error(e, step, args.repo_id, args.revision, api)
        if sentence is None:
            raise
        raise UserError(sentence) from None


def open_pull_request_with(api, repo_id: str, folder: Path, files: list[str]):
    """The first open (or draft) pull request of the token's user on `repo_id` whose head holds every file of the
    export (`folder`) as it is, or None; None too when `main` holds them all (the upload then makes no commit, and
    any pull request would hold them through main). LFS files are compared by the sha256 the manifest lists,
    others by git's blob id."""
    user = api.whoami().get("name")
    entries = read_manifest(folder)["files"]
    blob_ids: dict[str, str] = {}

    def holds(revision: str) -> bool:
        heads = {f.path: f for f in api.get_paths_info(repo_id, files, revision=revision)}
        for name in files:
            remote = heads.get(name)
            if remote is None or getattr(remote, "blob_id", None) is None:  # missing, or a folder of that name
                return False
            if remote.lfs is not None:
                if remote.lfs.sha256 != entries[name]["sha256"]:
                    return False
                continue
            if name not in blob_ids:
                blob_ids[name] = git_blob_id(folder / name)
            if remote.blob_id != blob_ids[name]:
                return False
        return True

    if not user or holds("main"):
        return None
    for pr in api.get_repo_discussions(repo_id, author=user, discussion_type="pull_request"):
        # the Hub opens an API-made pull request as a draft; the author is checked here too, not only by the filter
        if pr.author == user and pr.status in ("open", "draft") and holds(pr.git_reference):
            return pr
    return None


def git_blob_id(path: Path) -> str:
    """git's id of the file's content (sha1 of `blob {size}\\0` + content): what the Hub reports for a non-LFS file."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def explain_error(e: Exception, step: str, repo_id: str, revision: str | None, api) -> str | None:
    """One sentence for an error a user will meet, or None for one that is a bug (left as a traceback)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    namespace = repo_id.split("/")[0]
    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so huggingface_hub will not connect; unset it to upload"
    if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
        status = e.response.status_code
        if status == 401:
            return f"the Hub rejected the token (401 Unauthorized): it is invalid or expired; make one at {TOKENS_URL}"
        if status == 403:
            return _explain_forbidden(repo_id, api)
        if status == 404 and step == "create":
            return f"namespace {namespace!r} does not exist on the Hub (404): check the NAME part of --repo-id"
        if status == 404:
            return f"{repo_id} (revision {revision or 'main'}) was not found on the Hub (404)"
        if status == 429:
            return "the Hub is rate-limiting this account (429 Too Many Requests); wait a few minutes and run again"
        if status >= 500:
            return (
                f"the Hub answered {status} (a server error) during {_STEPS[step]}; nothing is wrong with the "
                "export: run the same command again later (unchanged files are skipped)"
            )
        server = getattr(e, "server_message", None) or str(e).splitlines()[0]
        return f"the Hub refused {_STEPS[step]} ({status}): {server}"
    if isinstance(e, _network_errors()):
        return (
            f"cannot reach the Hub at {constants.ENDPOINT} ({type(e).__name__}): check the network connection, "
            "proxy settings or HF_ENDPOINT"
        )
    if isinstance(e, (KeyError, json.JSONDecodeError)):  # an answer without the Hub's fields, or not JSON
        return (
            f"{constants.ENDPOINT} did not answer as the Hugging Face Hub does during {_STEPS[step]} "
            f"({type(e).__name__}): check HF_ENDPOINT"
        )
    if isinstance(e, ValueError) and step == "validate":  # "Invalid metadata in README.md.\n- why\n- why"
        reasons = "; ".join(line.strip().removeprefix("- ") for line in str(e).splitlines()[1:] if line.strip())
        return (
            f"the Hub refused the export's model card (README.md), so nothing was sent: {reasons or str(e)}; "
            "export again with values it accepts (--license, --language)"
        )
    if isinstance(e, ValueError):  # the library's own argument checks (repo id, ...)
        return f"huggingface_hub refused the request: {str(e).splitlines()[0]}"
    return None


_STEPS = {
    "validate": "the check of the model card's metadata",
    "create": "creating the repo",
    "info": "reading the repo's visibility",
    "branch": "creating the branch",
    "prs": "looking for an open pull request with these files",
    "upload": "the upload",
}


def _explain_forbidden(repo_id: str, api) -> str:
    """A 403 has three usual causes; whoami (which a read token may call) tells them apart."""
    namespace = repo_id.split("/")[0]
    try:
        me = api.whoami()
    except Exception:  # noqa: BLE001 - diagnosis is best effort
        me = {}
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return f"the token is read-only (403 Forbidden): make a token with write access at {TOKENS_URL}"
    user = me.get("name")
    if user and namespace != user and namespace not in {o.get("name") for o in me.get("orgs") or []}:
        return (
            f"{repo_id} is under {namespace!r}, which is neither your account ({user!r}) nor one of your "
            f"organizations (403 Forbidden): use --repo-id {user}/{repo_id.split('/')[1]}"
        )
    return f"the token may not write to {repo_id} (403 Forbidden): check its permissions at {TOKENS_URL}"


def _network_errors() -> tuple[type, ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (requests <1.0, httpx 1.x, httpx2 2.x)."""
    import importlib

    types: list[type] = [ConnectionError, TimeoutError]
    for module, names in (
        ("requests.exceptions", ("ConnectionError", "Timeout")),
        ("httpx", ("TransportError",)),
        ("httpx2", ("TransportError",)),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(types)


if __name__ == "__main__":
    from mlmtrain.cli import main as cli_main

    sys.exit(cli_main(["upload", *sys.argv[1:]]))
