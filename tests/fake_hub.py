"""A fake Hugging Face Hub for tests: it stands in for the real Hub (huggingface.co) so that
`mlmtrain upload` can be tested end to end with no network, through the real `huggingface_hub` client
pointed at it with `HF_ENDPOINT=http://127.0.0.1:PORT`.

It speaks only the subset of the Hub's HTTP API that `huggingface_hub` (0.30 to 2.x) uses for a small
`create_repo` + `create_branch` + `upload_folder`, read from the library's source:

    POST /api/repos/create                            create_repo (payload `private` <1.0, `visibility` >=1.0)
    GET  /api/models/{ns}/{name}[/revision/{rev}]     repo_info (after a 403 on create; no-op upload; visibility)
    POST /api/validate-yaml                           the model card's YAML header check
    POST /api/models/{ns}/{name}/preupload/{rev}      upload modes: always "regular" (inline base64)
    POST /api/models/{ns}/{name}/commit/{rev}         the NDJSON commit (`?create_pr=1` on the old path)
    POST /api/models/{ns}/{name}/branch/{branch}      create_branch
    POST /api/models/{ns}/{name}/discussions          open a pull request (the >=1.x xet upload path)
    GET  /api/models/{ns}/{name}/discussions          list them (`?type=`, `?status=`, `?author=`; one page)
    GET  /api/models/{ns}/{name}/discussions/{num}    its details
    POST /api/models/{ns}/{name}/paths-info/{rev}     files at a revision: size, git blob oid, `*.safetensors` as LFS
    GET  /api/whoami-v2                               who the token belongs to and its role
    GET  /api/agent-harnesses                         a registry >=2.x fetches for its user agent (empty)

Not covered: LFS/Xet transfers (the real Hub sends `*.safetensors` and big files that way; here every file
goes inline, so tests keep files small), deletions, copies, tags, downloads. Any other request is answered
501 and recorded in `unknown`, so a test can assert the client stayed inside this subset.

Permissions follow the real Hub's rules closely enough to produce its errors: no or unknown token -> 401;
a read token -> 403 on every write; writing to a namespace that is neither the user's nor one of their
orgs -> 403; creating a repo under a namespace that does not exist -> 404. `fail_next(route, status)`
injects a status for the next request(s) to a route, to test retries and 5xx handling.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HUB_LICENSES = ("apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "other")  # a few of the real Hub's list


def git_blob_oid(data: bytes) -> str:
    """The oid the Hub reports for a regular file (git's sha1 of `blob {size}\\0` + content)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Token:
    user: str
    role: str = "write"  # "write" | "read"


@dataclass
class Repo:
    owner: str
    private: bool = False
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})  # ref -> {path: bytes}
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})  # ref -> commit oid
    prs: list[dict] = field(default_factory=list)  # pull request num - 1 -> {"author", "title", "status"}


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query string
    query: dict[str, list[str]]
    headers: Message  # case-insensitive .get(), as HTTP header names are
    body: bytes


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.endpoint` is the URL to put in HF_ENDPOINT."""

    def __init__(self, tokens: dict[str, Token] | None = None, orgs: dict[str, list[str]] | None = None):
        self.tokens = tokens or {}
        self.orgs = orgs or {}  # user -> orgs they can write to
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}, "create_pr"}
        self.unknown: list[str] = []
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, owner: str, private: bool = False, files: dict[str, bytes] | None = None):
        self.repos[repo_id] = Repo(owner=owner, private=private)
        if files:
            self._commit(repo_id, "main", "initial", files)

    def fail_next(self, route: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests to `route` (e.g. "preupload", "create") with `status`."""
        self._failures.setdefault(route, []).extend([status] * times)

    def open_pr(self, repo_id: str, author: str, title: str = "", status: str = "draft") -> int:
        """A new pull request on `repo_id`, its ref starting at main's head; returns its number."""
        repo = self.repos[repo_id]
        repo.prs.append({"author": author, "title": title, "status": status})
        ref = f"refs/pr/{len(repo.prs)}"
        repo.refs[ref], repo.heads[ref] = dict(repo.refs["main"]), repo.heads["main"]
        return len(repo.prs)

    def set_pr_status(self, repo_id: str, num: int, status: str) -> None:
        self.repos[repo_id].prs[num - 1]["status"] = status

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].refs[ref])

    # -- permissions and state -------------------------------------------------------------------

    def namespaces(self) -> set[str]:
        known = set(t.user for t in self.tokens.values()) | {r.owner for r in self.repos.values()}
        return known | {org for orgs in self.orgs.values() for org in orgs}

    def can_write(self, token: Token, namespace: str) -> bool:
        return token.role == "write" and (namespace == token.user or namespace in self.orgs.get(token.user, []))

    def _commit(self, repo_id: str, ref: str, summary: str, files: dict[str, bytes]) -> str:
        repo = self.repos[repo_id]
        repo.refs[ref].update(files)
        oid = hashlib.sha1(f"{repo_id}:{ref}:{len(self.commits)}:{summary}".encode()).hexdigest()
        repo.heads[ref] = oid
        return oid


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def _send(self, status: int, body: dict | None = None, headers: dict[str, str] | None = None):
            data = json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            req = Request(method, unquote(url.path), parse_qs(url.query), self.headers, body)
            with hub._lock:
                hub.requests.append(req)
                route, match = _route(method, url.path)
                if route is None:
                    hub.unknown.append(f"{method} {self.path}")
                    return self._error(501, f"fake hub: no such endpoint {method} {url.path}")
                if hub._failures.get(route):
                    status = hub._failures[route].pop(0)
                    return self._error(status, f"fake hub: injected {status} on {route}")
                return getattr(self, f"_{route}")(req, *[unquote(g) for g in match.groups()])

        def _token(self, req: Request) -> Token | None:
            auth = req.headers.get("Authorization") or ""
            return hub.tokens.get(auth.removeprefix("Bearer "))

        def _writer(self, req: Request, repo_id: str) -> Token | None:
            """The token if it may write to `repo_id`; otherwise answers 401/403/404 and returns None."""
            token = self._token(req)
            if token is None:
                self._error(401, "Invalid credentials in Authorization header")
                return None
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not hub.can_write(token, repo.owner)):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if not hub.can_write(token, repo.owner):
                self._error(403, "You don't have the rights to write to this repo")
                return None
            return token

        def _reader(self, req: Request, repo_id: str) -> Repo | None:
            """The repo if the request may read it (public, or private and the token's); otherwise answers 404."""
            repo, token = hub.repos.get(repo_id), self._token(req)
            if repo is None or (repo.private and (token is None or not hub.can_write(token, repo.owner))):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            return repo

        # -- endpoints -------------------------------------------------------------------------

        def _whoami(self, req: Request):
            token = self._token(req)
            if token is None:
                return self._error(401, "Invalid credentials in Authorization header")
            orgs = [{"name": o} for o in hub.orgs.get(token.user, [])]
            self._send(
                200,
                {
                    "type": "user",
                    "name": token.user,
                    "orgs": orgs,
                    "auth": {"type": "access_token", "accessToken": {"role": token.role}},
                },
            )

        def _create(self, req: Request):
            token = self._token(req)
            if token is None:
                return self._error(401, "Invalid credentials in Authorization header")
            payload = json.loads(req.body)
            namespace = payload.get("organization") or token.user
            repo_id = f"{namespace}/{payload['name']}"
            if namespace not in hub.namespaces():
                return self._error(404, f"Namespace {namespace} not found")
            if not hub.can_write(token, namespace):
                return self._error(403, f"You don't have the rights to create a model under the namespace {namespace}")
            if repo_id in hub.repos:  # the real Hub's 409 names the existing repo; exist_ok=True relies on it
                message = "You already created this model repo"
                return self._send(
                    409, {"error": message, "url": f"{hub.endpoint}/{repo_id}"}, {"X-Error-Message": message}
                )
            private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
            hub.add_repo(repo_id, owner=namespace, private=private)
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _info(self, req: Request, repo_id: str, revision: str | None = None):
            repo = self._reader(req, repo_id)
            if repo is None:
                return
            ref = revision or "main"
            if ref not in repo.refs:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            siblings = [{"rfilename": p} for p in sorted(repo.refs[ref])]
            self._send(200, {"id": repo_id, "sha": repo.heads[ref], "private": repo.private, "siblings": siblings})

        def _harnesses(self, req: Request):
            self._send(200, {"standardEnvVars": [], "harnesses": {}})

        def _validate_yaml(self, req: Request):  # the real Hub checks much more; the license is the likely slip
            header = json.loads(req.body)["content"].split("---")[1]
            license = re.search(r"^license: *(\S*)", header, re.M)
            if license and license[1] not in HUB_LICENSES:
                message = f'"license" must be one of [{", ".join(HUB_LICENSES)}]'
                return self._send(400, {"errors": [{"message": message}], "warnings": []})
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, req: Request, repo_id: str, revision: str):
            if self._writer(req, repo_id) is None:
                return
            existing = hub.repos[repo_id].refs.get(revision, {})
            files = []
            for f in json.loads(req.body)["files"]:
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if f["path"] in existing:
                    entry["oid"] = git_blob_oid(existing[f["path"]])
                files.append(entry)
            self._send(200, {"files": files, "commitOid": hub.repos[repo_id].heads.get(revision)})

        def _commit(self, req: Request, repo_id: str, revision: str):
            token = self._writer(req, repo_id)
            if token is None:
                return
            repo = hub.repos[repo_id]
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {}
            for x in lines:
                if x["key"] == "file":
                    assert x["value"]["encoding"] == "base64"
                    files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                elif x["key"] != "header":
                    return self._error(400, f"fake hub: '{x['key']}' operations are not supported")
            create_pr = req.query.get("create_pr") == ["1"]
            pr_url = None
            if create_pr:  # the commit itself opens the pull request
                num = hub.open_pr(repo_id, token.user, header["summary"], "open")
                revision = f"refs/pr/{num}"
                pr_url = f"{hub.endpoint}/{repo_id}/discussions/{num}"
            if revision not in repo.refs:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            oid = hub._commit(repo_id, revision, header["summary"], files)
            hub.commits.append(
                {
                    "repo": repo_id,
                    "revision": revision,
                    "summary": header["summary"],
                    "files": files,
                    "create_pr": create_pr,
                }
            )
            self._send(
                200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}
            )

        def _branch(self, req: Request, repo_id: str, branch: str):
            if self._writer(req, repo_id) is None:
                return
            repo = hub.repos[repo_id]
            if branch in repo.refs:
                return self._error(409, "Reference already exists")
            start = json.loads(req.body or b"{}").get("startingPoint") or "main"
            repo.refs[branch], repo.heads[branch] = dict(repo.refs[start]), repo.heads[start]
            self._send(200, {})

        def _open_pr(self, req: Request, repo_id: str):
            token = self._writer(req, repo_id)
            if token is None:
                return
            num = hub.open_pr(repo_id, token.user, json.loads(req.body or b"{}").get("title", ""))
            self._send(200, {"num": num, "url": f"{hub.endpoint}/{repo_id}/discussions/{num}"})

        def _list_prs(self, req: Request, repo_id: str):
            repo = self._reader(req, repo_id)
            if repo is None:
                return
            want = {k: v[0] for k, v in req.query.items() if k in ("type", "status", "author")}
            found = [
                {
                    "title": pr["title"],
                    "num": num,
                    "author": {"name": pr["author"]},
                    "createdAt": "2026-11-24T00:00:00.000Z",
                    "status": pr["status"],
                    "repo": {"name": repo_id, "type": "model"},
                    "isPullRequest": True,
                }
                for num, pr in reversed(list(enumerate(hub.repos[repo_id].prs, 1)))  # newest first
                if want.get("author") in (None, pr["author"]) and want.get("status") in (None, "all", pr["status"])
                and want.get("type") in (None, "all", "pull_request")
            ]  # fmt: skip
            self._send(200, {"discussions": found, "count": len(found), "start": 0, "numItems": len(found)})

        def _paths_info(self, req: Request, repo_id: str, revision: str):
            repo = self._reader(req, repo_id)
            if repo is None:
                return
            files = repo.refs.get(revision)
            if files is None:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            paths = parse_qs(req.body.decode())["paths"]
            self._send(200, [_path_info(p, files[p]) for p in paths if p in files])

        def _pr_details(self, req: Request, repo_id: str, num: str):
            self._send(
                200,
                {
                    "title": "upload",
                    "num": int(num),
                    "author": {"name": "fake"},
                    "status": "draft",
                    "createdAt": "2026-11-24T00:00:00.000Z",
                    "repo": {"name": repo_id, "type": "model"},
                    "isPullRequest": True,
                    "events": [],
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                    "diff": "",
                },
            )

    return Handler


_REPO = r"/api/models/([^/]+/[^/]+)"
_ROUTES = [  # (method, regex on the raw path, handler name)
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "harnesses"),
    ("POST", r"/api/repos/create", "create"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", _REPO + r"/preupload/(.+)", "preupload"),
    ("POST", _REPO + r"/commit/(.+)", "commit"),
    ("POST", _REPO + r"/branch/(.+)", "branch"),
    ("POST", _REPO + r"/discussions", "open_pr"),
    ("GET", _REPO + r"/discussions", "list_prs"),
    ("POST", _REPO + r"/paths-info/(.+)", "paths_info"),
    ("GET", _REPO + r"/discussions/(\d+)", "pr_details"),
    ("GET", _REPO + r"/revision/(.+)", "info"),
    ("GET", _REPO, "info"),
]


def _path_info(path: str, data: bytes) -> dict:
    """paths-info's entry for a file; `*.safetensors` as the Hub stores them, in LFS (its git blob is the pointer)."""
    if not path.endswith(".safetensors"):
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    lfs = {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(pointer), "lfs": lfs}


def _route(method: str, path: str):
    for m, pattern, name in _ROUTES:
        match = re.fullmatch(pattern, path)
        if m == method and match:
            return name, match
    return None, None
