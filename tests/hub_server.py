"""A small in-process Hugging Face Hub for tests (test helper, not part of the package).

It speaks enough of the Hub HTTP API for the *real* ``huggingface_hub`` client (and timm's
``hf-hub:`` loading on top of it) to run end to end against ``127.0.0.1``:

==========================================================  =============================================
request                                                     used by
==========================================================  =============================================
``POST   /api/repos/create``                                ``create_repo`` (409 + ``url`` when it exists)
``DELETE /api/repos/delete``                                ``delete_repo``
``POST   /api/validate-yaml``                               ``upload_folder`` / ``create_commit`` (README.md)
``POST   /api/{type}s/{repo}/preupload/{rev}``              ``upload_*`` / ``create_commit``
``POST   /api/{type}s/{repo}/commit/{rev}``                 ``upload_*`` / ``create_commit`` (NDJSON)
``POST   /api/{type}s/{repo}/branch/{branch}``              ``create_branch``
``GET    /api/{type}s/{repo}[/revision/{rev}]``             ``model_info`` / ``repo_info`` / ``repo_exists``
``GET    /api/{type}s/{repo}/tree/{rev}[/{path}]``          ``list_repo_files`` / ``list_repo_tree``
``HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}``         ``hf_hub_download`` / ``file_exists``
``GET    /api/whoami-v2``                                   ``whoami``
==========================================================  =============================================

Anything else is answered with a 404 and recorded in :attr:`LocalHub.unhandled`.

Uploads never use Xet or LFS: the preupload endpoint answers ``uploadMode: "regular"`` for every file,
so the client sends all contents base64-encoded inside the NDJSON commit. This holds on both upload
paths of huggingface_hub 2.x: ``create_commit``/``upload_file`` and the ``hf_xet`` "pipelined"
``upload_folder`` (used whenever ``hf_xet`` is installed): the pipeline only opens a Xet upload for
files whose mode is not ``"regular"``.

Use it through the :func:`local_hub` pytest fixture, or :func:`running_local_hub` outside of pytest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

DEFAULT_TOKEN = "hf_test_local_hub_token"
DEFAULT_USER = "test-user"
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
# A 5xx that huggingface_hub does NOT retry: the xet-pipelined `upload_folder` sends its commit through
# `http_backoff`, which retries 408/429/500/502/503/504 (with 1+2+4+8+8 s of sleep). A one-shot 500 would
# therefore be retried and the push would *succeed*; 507 makes both upload paths fail at once.
DEFAULT_FAIL_STATUS = 507

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_SUBPATHS = {"preupload", "commit", "revision", "tree", "branch", "refs", "commits", "resolve", "discussions"}


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob; what the Hub reports (and huggingface_hub compares) for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, bytes]  # full snapshot of the tree at this commit
    date: str = field(default_factory=_now_iso)


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # commit oid -> commit
    created_at: str = field(default_factory=_now_iso)
    pull_requests: dict[int, dict] = field(default_factory=dict)  # number -> {"title", "description", "createdAt"}

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit oid -> the commit, or None."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    @property
    def head(self) -> Commit:
        return self.commits[self.branches["main"]]

    @property
    def files(self) -> dict[str, bytes]:
        """Files at the head of ``main``: path -> content (a copy)."""
        return dict(self.head.files)

    @property
    def history(self) -> list[Commit]:
        """Commits of ``main``, newest first (the initial ``.gitattributes`` commit last)."""
        out, oid = [], self.branches["main"]
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out


@dataclass
class RequestRecord:
    method: str
    path: str  # path + query, as sent
    status: int

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """An in-memory Hub served on ``127.0.0.1:<free port>`` by a background thread.

    Attributes:
        url: base URL (what ``HF_ENDPOINT`` is set to).
        token: the token writes must carry (``None``: any or no token is accepted).
        repos: ``{"org/name": Repo}`` for models, ``{"datasets/org/name": Repo}`` for other types.
            ``hub.repos["org/name"].files`` is ``{path: bytes}`` at the head of ``main``;
            ``.history`` lists the commits (newest first); ``.branches`` maps branch -> commit oid.
        requests: every request served, as :class:`RequestRecord` (``str(r)``: ``"POST /api/... -> 200"``).
        unhandled: the requests that matched no route (answered 404).
        fail_next_commit: set to True and the next ``/commit`` request is refused with
            ``fail_commit_status`` (default 507, a 5xx the client does not retry) and nothing is committed;
            the flag then resets itself.
        fail_commits: the number of upcoming ``/commit`` requests to refuse (``fail_next_commit = True``
            is ``fail_commits = 1``); use it with ``fail_commit_status = 500`` to exercise client retries.
    """

    def __init__(self, token: str | None = DEFAULT_TOKEN, user: str = DEFAULT_USER):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[RequestRecord] = []
        self.unhandled: list[RequestRecord] = []
        self.fail_commits = 0
        self.fail_commit_status = DEFAULT_FAIL_STATUS
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    @property
    def fail_next_commit(self) -> bool:
        return self.fail_commits > 0

    @fail_next_commit.setter
    def fail_next_commit(self, value: bool) -> None:
        self.fail_commits = 1 if value else 0

    def api(self, **kwargs):
        """A ``huggingface_hub.HfApi`` pointed at this hub with its token."""
        from huggingface_hub import HfApi

        kwargs.setdefault("token", self.token)
        return HfApi(endpoint=self.url, **kwargs)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[_TYPE_PREFIX[repo_type] + repo_id]

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly (with its initial ``.gitattributes`` commit, like the real Hub)."""
        with self.lock:
            key = _TYPE_PREFIX[repo_type] + repo_id
            if key in self.repos:
                return self.repos[key]
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            self.repos[key] = repo
            self._add_commit(repo, "main", "initial commit", "", {".gitattributes": DEFAULT_GITATTRIBUTES})
            return repo

    def endpoints_called(self) -> list[str]:
        """Distinct ``METHOD /route -> status`` served, repo ids and revisions folded to placeholders."""
        seen: dict[str, None] = {}
        for r in self.requests:
            seen.setdefault(f"{r.method} {_route_template(r.path)} -> {r.status}")
        return list(seen)

    # ------------------------------------------------------------------ internals

    def new_pull_request(self, repo: Repo, title: str, description: str) -> int:
        """Open pull request N (call under ``self.lock``): its ``refs/pr/N`` starts at main's head."""
        num = 1 + len(repo.pull_requests)
        repo.pull_requests[num] = {"title": title, "description": description, "createdAt": _now_iso()}
        repo.branches[f"refs/pr/{num}"] = repo.branches["main"]
        return num

    def _add_commit(self, repo: Repo, branch: str, summary: str, description: str, files: dict) -> Commit:
        parent = repo.branches.get(branch)
        h = hashlib.sha1()
        h.update(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{summary}\n{next(self._counter)}\n".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        commit = Commit(h.hexdigest(), parent, summary, description, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_TYPE_PREFIX[repo.repo_type]}{repo.repo_id}"


def _route_template(path: str) -> str:
    """``/api/models/org/x/preupload/main?a=1`` -> ``/api/models/{repo_id}/preupload/{revision}``."""
    raw = urlsplit(path).path
    segs = raw.strip("/").split("/")
    if raw.startswith("/api/") and len(segs) >= 3 and segs[1] in _REPO_TYPES:
        rest = segs[2:]
        n = 1 if len(rest) >= 2 and rest[1] in _API_SUBPATHS else min(2, len(rest))
        rest = rest[n:]
        out = f"/api/{segs[1]}/{{repo_id}}"
        if rest:
            out += f"/{rest[0]}"
            if len(rest) > 1:
                out += "/{revision}" if rest[0] != "branch" else "/{branch}"
            if len(rest) > 2:
                out += "/{path}"
        return out
    if "/resolve/" in raw:
        prefix = segs[0] + "/" if segs[0] in _REPO_TYPES and segs[0] != "models" else ""
        return f"/{prefix}{{repo_id}}/resolve/{{revision}}/{{filename}}"
    return raw


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response carries a Content-Length
    timeout = 30  # an idle keep-alive connection does not pin a thread forever
    server_version = "LocalHub/1.0"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    # ------------------------------------------------------------------ plumbing

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = ""):
        # Record before answering: once the client has its response, a test may inspect `hub.requests`.
        self.hub.requests.append(RequestRecord(self.command, self.path, status))
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers, "application/json; charset=utf-8")

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            handled = self._route(method, url.path, query, body)
            if not handled:
                rec = RequestRecord(method, self.path, 404)
                self.hub.unhandled.append(rec)
                raise _HubError(404, f"LocalHub: no route for {method} {url.path}")
        except _HubError as e:
            headers = dict(e.headers)
            headers["X-Error-Message"] = e.message
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in this test server: answer 500 rather than hang the client
            import traceback

            traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(OSError):
                self._json(500, {"error": f"LocalHub internal error: {e!r}"})

    # ------------------------------------------------------------------ auth

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _require_write_token(self) -> None:
        token = self._bearer()
        if token is None:
            raise _HubError(401, "You must be authenticated to access this resource.")
        if self.hub.token is not None and token != self.hub.token:
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _can_read(self, repo: Repo) -> bool:
        return not repo.private or self.hub.token is None or self._bearer() == self.hub.token

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, path: str, query: dict, body: bytes) -> bool:
        segs = path.strip("/").split("/")
        if path.startswith("/api/"):
            if path == "/api/repos/create" and method == "POST":
                return self._create_repo(body)
            if path == "/api/repos/delete" and method == "DELETE":
                return self._delete_repo(body)
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(body)
            if path == "/api/whoami-v2" and method == "GET":
                return self._whoami()
            if len(segs) >= 3 and segs[1] in _REPO_TYPES:
                return self._repo_api(method, _REPO_TYPES[segs[1]], segs[2:], query, body)
            return False
        if "resolve" in segs and method in ("GET", "HEAD"):
            return self._resolve(segs)
        return False

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get(_TYPE_PREFIX[repo_type] + repo_id)
        if repo is None or not self._can_read(repo):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, body: bytes) -> bool:
        self._require_write_token()
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if not name:
            raise _HubError(400, "Missing 'name'")
        namespace = payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo_id = f"{namespace}/{name}"
        with self.hub.lock:
            existing = self.hub.repos.get(_TYPE_PREFIX[repo_type] + repo_id)
            if existing is not None:
                # Like the Hub: 409, with the url in the body (`create_repo(exist_ok=True)` reads it).
                message = f"You already created this {repo_type} repo"
                url = self.hub._repo_url(existing)
                self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
                return True
            repo = self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        self._json(200, {"url": self.hub._repo_url(repo), "name": repo_id, "id": repo_id})
        return True

    def _delete_repo(self, body: bytes) -> bool:
        self._require_write_token()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or self.hub.user
        key = _TYPE_PREFIX[payload.get("type") or "model"] + f"{namespace}/{payload.get('name')}"
        with self.hub.lock:
            if self.hub.repos.pop(key, None) is None:
                raise _HubError(404, "Repository not found", "RepoNotFound")
        self._json(200, {})
        return True

    def _validate_yaml(self, body: bytes) -> bool:
        content = json.loads(body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end == -1:
                errors.append({"message": "Unterminated YAML front matter"})
            else:
                try:
                    import yaml

                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "YAML front matter must be a mapping"})
                except ImportError:
                    pass
                except Exception as e:  # yaml.YAMLError
                    errors.append({"message": f"Invalid YAML: {e}"})
        if errors:
            self._json(400, {"errors": errors, "warnings": []})
        else:
            self._json(200, {"errors": [], "warnings": []})
        return True

    def _whoami(self) -> bool:
        if self._bearer() is None or (self.hub.token is not None and self._bearer() != self.hub.token):
            raise _HubError(401, "Invalid credentials in Authorization header")
        self._json(
            200,
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )
        return True

    def _repo_api(self, method: str, repo_type: str, rest: list[str], query: dict, body: bytes) -> bool:
        # rest = <repo_id segments> [<subpath> <revision-or-branch> [path...]]; repo ids have 1 or 2 segments
        n = 1 if len(rest) >= 2 and rest[1] in _API_SUBPATHS else min(2, len(rest))
        repo_id, tail = "/".join(rest[:n]), rest[n:]
        repo = self._get_repo(repo_type, repo_id)
        if not tail:
            if method != "GET":
                return False
            return self._repo_info(repo, "main")
        action, args = tail[0], [unquote(s) for s in tail[1:]]
        if action == "revision" and method == "GET" and len(args) == 1:
            return self._repo_info(repo, args[0])
        if action == "preupload" and method == "POST" and len(args) == 1:
            return self._preupload(repo, args[0], body)
        if action == "commit" and method == "POST" and len(args) == 1:
            return self._commit(repo, args[0], query, body)
        if action == "tree" and method == "GET" and args:
            return self._tree(repo, args[0], "/".join(args[1:]), query)
        if action == "branch" and method == "POST" and len(args) == 1:
            return self._create_branch(repo, args[0], body)
        if action == "discussions" and method == "POST" and not args:
            return self._open_pull_request(repo, body)
        if action == "discussions" and method == "GET" and len(args) == 1 and args[0].isdigit():
            return self._pull_request(repo, int(args[0]))
        return False

    def _repo_info(self, repo: Repo, revision: str) -> bool:
        commit = self._get_commit(repo, revision)
        siblings = [
            {"rfilename": path, "size": len(content), "blobId": git_blob_sha1(content)}
            for path, content in sorted(commit.files.items())
        ]
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "siblings": siblings,
            "usedStorage": sum(len(c) for c in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._json(200, info)
        return True

    def _preupload(self, repo: Repo, revision: str, body: bytes) -> bool:
        self._require_write_token()
        payload = json.loads(body or b"{}")
        commit = repo.resolve(revision)  # may be None: a new branch / PR ref
        files = []
        for f in payload.get("files", []):
            existing = commit.files.get(f["path"]) if commit is not None else None
            files.append(
                {
                    "path": f["path"],
                    # Always "regular": content travels base64-encoded in the NDJSON commit; no Xet, no LFS.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    # The remote git oid lets the client skip files that did not change (no empty commits).
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._json(200, {"files": files, "commitOid": commit.oid if commit is not None else None})
        return True

    def _commit(self, repo: Repo, revision: str, query: dict, body: bytes) -> bool:
        self._require_write_token()
        hub = self.hub
        with hub.lock:
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                raise _HubError(hub.fail_commit_status, "LocalHub: simulated commit failure (fail_commits)")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        create_pr = query.get("create_pr") in ("1", "true", "True")
        with hub.lock:
            base = self._get_commit(repo, revision)
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != base.oid:
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[path] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    # Never requested (preupload says "regular"); accept it only as a copy of known content.
                    blob = _find_blob_by_sha256(hub, value.get("oid", ""))
                    if blob is None:
                        raise _HubError(422, f"LFS object {value.get('oid')} was never uploaded")
                    files[path] = blob
                elif key == "deletedFile":
                    if path not in files:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise _HubError(404, f"No folder with this name: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise _HubError(400, f"Unknown NDJSON key {key!r}")
            branch = revision
            pr_url = None
            if create_pr:
                num = hub.new_pull_request(repo, header.get("summary", ""), header.get("description", ""))
                branch = f"refs/pr/{num}"
                pr_url = f"{hub._repo_url(repo)}/discussions/{num}"
            elif revision not in repo.branches:
                raise _HubError(400, f"Cannot commit to {revision!r}: not a branch")
            summary, description = header.get("summary", ""), header.get("description", "")
            commit = hub._add_commit(repo, branch, summary, description, files)
        answer = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{hub._repo_url(repo)}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if pr_url is not None:
            answer["pullRequestUrl"] = pr_url
        self._json(200, answer)
        return True

    def _open_pull_request(self, repo: Repo, body: bytes) -> bool:
        """A draft pull request (discussions API): a ``refs/pr/N`` ref at main's head that commits then go to."""
        self._require_write_token()
        payload = json.loads(body or b"{}")
        if not payload.get("pullRequest"):
            raise _HubError(400, "LocalHub: only pull requests are supported, not plain discussions")
        with self.hub.lock:
            num = self.hub.new_pull_request(repo, payload.get("title", ""), payload.get("description", ""))
        self._json(200, {"num": num})
        return True

    def _pull_request(self, repo: Repo, num: int) -> bool:
        pr = repo.pull_requests.get(num)
        if pr is None:
            raise _HubError(404, f"Discussion {num} not found")
        self._json(200, {
            "num": num, "title": pr["title"], "status": "draft", "isPullRequest": True, "createdAt": pr["createdAt"],
            "author": {"name": self.hub.user}, "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
        })
        return True

    def _create_branch(self, repo: Repo, branch: str, body: bytes) -> bool:
        self._require_write_token()
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.branches:
                raise _HubError(409, f"Reference already exists: {branch}")
            repo.branches[branch] = self._get_commit(repo, start).oid
        self._json(200, {})
        return True

    def _tree(self, repo: Repo, revision: str, folder: str, query: dict) -> bool:
        commit = self._get_commit(repo, revision)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if not recursive and depth > 1:
                    break
                d = prefix + "/".join(parts[:depth])
                oid = hashlib.sha1(d.encode()).hexdigest()
                entries.setdefault(d, {"type": "directory", "path": d, "oid": oid})
            if recursive or len(parts) == 1:
                oid = git_blob_sha1(content)
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": oid}
        if prefix and not entries:
            raise _HubError(404, f"Entry not found: {folder}", "EntryNotFound")
        # folders first, then files (as the Hub lists them)
        self._json(200, sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"])))
        return True

    def _resolve(self, segs: list[str]) -> bool:
        i = segs.index("resolve")
        repo_segs, after = segs[:i], segs[i + 1 :]
        repo_type = "model"
        if repo_segs and repo_segs[0] in ("datasets", "spaces"):
            repo_type, repo_segs = _REPO_TYPES[repo_segs[0]], repo_segs[1:]
        if not repo_segs or len(after) < 2:
            return False
        repo = self._get_repo(repo_type, unquote("/".join(repo_segs)))
        commit = self._get_commit(repo, unquote(after[0]))
        filename = unquote("/".join(after[1:]))
        content = commit.files.get(filename)
        if content is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha1(content)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(filename.rsplit("/", 1)[-1])}"',
        }
        status, payload = 200, content
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and "," not in rng:
            start_s, _, end_s = rng[len("bytes=") :].partition("-")
            size = len(content)
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else size - 1
            else:  # suffix range: the last N bytes
                start, end = max(size - int(end_s), 0), size - 1
            end = min(end, size - 1)
            if start >= size or start > end:
                raise _HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status, payload = 206, content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, payload, headers, "application/octet-stream")
        return True


def _find_blob_by_sha256(hub: LocalHub, sha256: str) -> bytes | None:
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            for content in commit.files.values():
                if hashlib.sha256(content).hexdigest() == sha256:
                    return content
    return None


# ---------------------------------------------------------------------- client patching


def patch_hf_client(mp: pytest.MonkeyPatch, url: str, token: str | None, home: Path) -> None:
    """Point the already-imported huggingface_hub (and what copied its settings) at ``url``.

    huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``... into
    ``huggingface_hub.constants`` once, at import; setting the environment variables afterwards changes
    nothing. Everything is undone by ``mp`` (a ``pytest.MonkeyPatch``).
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    home = Path(home)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)

    # Environment: for code that reads it at call time, and for subprocesses / hf_xet.
    mp.setenv("HF_ENDPOINT", url)
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_CACHE", str(hub_cache))
    mp.setenv("HF_XET_CACHE", str(home / "xet"))
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN"):
        mp.delenv(var, raising=False)
    if token is not None:
        mp.setenv("HF_TOKEN", token)  # read at call time by huggingface_hub.utils._auth.get_token()
    else:
        mp.delenv("HF_TOKEN", raising=False)
    # A proxy from the environment must not swallow requests to 127.0.0.1 (httpx2 honours NO_PROXY).
    for var in ("NO_PROXY", "no_proxy"):
        mp.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))

    # Values copied into huggingface_hub.constants at import time.
    mp.setattr(constants, "ENDPOINT", url)  # every API call; RepoUrl; hf_hub_url
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})  # parse_hf_uri of web urls
    mp.setattr(constants, "HF_HUB_OFFLINE", False)  # checked on every request by hf_request_event_hook
    mp.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # hf_hub_download / snapshot_download default
    mp.setattr(constants, "HF_HOME", str(home))
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # never read a developer's stored token
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    mp.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)  # send the fake token
    # Telemetry on => the user-agent builder calls detect_agent(), which GETs {ENDPOINT}/api/agent-harnesses
    # once per process and caches it under HF_HOME. Off keeps the flow to the calls under test.
    mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    mp.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))

    # Objects that copied the endpoint at import time.
    mp.setattr(hf_api.api, "endpoint", url)  # the module-level HfApi behind huggingface_hub.create_repo etc.
    mp.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})  # redirects keeping auth
    for module_name in ("huggingface_hub.utils._git_credential", "huggingface_hub.cli.auth"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "ENDPOINT"):
            mp.setattr(module, "ENDPOINT", url)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        mp.setattr(transformers_hub, "_hf_api", None)  # transformers' shared HfApi kept the endpoint of its first use
    cache_manager = sys.modules.get("huggingface_hub.utils._cache_manager")
    if cache_manager is not None:
        mp.setattr(cache_manager, "HF_HUB_CACHE", str(hub_cache))  # scan_cache_dir default

    # The shared httpx2 client was built with the environment (proxies) of its first use: rebuild it.
    _http.close_session()


@contextlib.contextmanager
def running_local_hub(home: str | Path, token: str | None = DEFAULT_TOKEN) -> Iterator[LocalHub]:
    """Start a :class:`LocalHub` and point huggingface_hub at it (HF cache under ``home``); undo on exit."""
    from huggingface_hub.utils import _http

    with LocalHub(token=token) as hub, pytest.MonkeyPatch.context() as mp:
        patch_hf_client(mp, hub.url, token, Path(home))
        try:
            yield hub
        finally:
            _http.close_session()  # drop keep-alive connections to the server before it stops


@pytest.fixture
def local_hub(tmp_path) -> Iterator[LocalHub]:
    """A fresh :class:`LocalHub` per test, with huggingface_hub (and timm on top) pointed at it.

    Works when the suite runs with ``HF_HUB_OFFLINE=1``. Fake token ``hf_test_local_hub_token``
    (``HF_TOKEN``); HF cache in ``tmp_path / "hf_home" / "hub"`` (so nothing leaks between tests).
    """
    with running_local_hub(tmp_path / "hf_home") as hub:
        yield hub
