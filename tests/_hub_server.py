"""A loopback server that speaks the part of the Hub's HTTP API huggingface_hub uses to read a
model repo, served from a local folder, with fault injection (tests only).

Endpoints: `GET /api/models/{repo}/revision/{rev}` (model info, `?blobs=true` adds sizes and LFS
sha256), `GET /api/models/{repo}/tree/{rev}` (recursive listing), `POST
/api/models/{repo}/paths-info/{rev}`, and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with the
headers the client reads (X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size, Content-Length) and
Range support. `*.safetensors` files are LFS files (etag = sha256), the rest plain git blobs.

Faults (`HubServer.faults`, a list of `Fault`): a status code (every time or the first `times`
requests), a cut connection (headers then half the body, then close), a bounded stall, a redirect
loop, or corrupted bytes; each matches a request kind (`info`, `tree`, `paths`, `resolve`) and a
file name substring. `HubServer.requests` records (method, path) of every request,
`HubServer.served` (file, Range header, bytes) of every file body sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "c0ffee0123456789abcdef0123456789abcdef01"
_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
STALL_CAP_S = 20.0  # a stall never outlives this, so a test that fails still ends


@dataclass
class Fault:
    kind: str  # "info", "tree", "paths", "resolve" or "any"
    action: str  # "status", "cut", "stall", "stall-get", "redirect-loop", "corrupt"
    status: int = 500
    match: str = ""  # substring of the file name (resolve) or of the path
    times: int | None = None  # None: every matching request
    seconds: float = 10.0  # stall length (capped by STALL_CAP_S)
    error_code: str = ""  # X-Error-Code header (GatedRepo, RepoNotFound, ...)
    hits: int = 0


@dataclass
class Repo:
    folder: Path
    commit: str = COMMIT
    refs: dict[str, str] = field(default_factory=dict)  # extra branch/tag -> commit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """`with HubServer({"org/name": Repo(folder)}) as hub:` -> hub.url is the HF_ENDPOINT."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self.served: list[tuple[str, str | None, int]] = []  # resolve bodies: (file, Range, bytes)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def fault_for(self, kind: str, name: str, *, head: bool = False) -> Fault | None:
        """The first matching fault with tries left (cut and stall-get spare HEAD requests)."""
        with self._lock:
            for f in self.faults:
                if head and f.action in ("cut", "stall-get"):
                    continue
                if f.kind in (kind, "any") and f.match in name:
                    if f.times is not None and f.hits >= f.times:
                        continue
                    f.hits += 1
                    return f
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("BoundHandler", (Handler,), {"server_state": self})


class Handler(BaseHTTPRequestHandler):
    server_state: HubServer  # set on the subclass each server makes

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._dispatch(body=True)

    def _dispatch(self, *, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.server_state.requests.append((self.command, path))
        if m := _API.fullmatch(path):
            repo_id, what, rev, _ = m.groups()
            what, rev = what or "revision", rev or "main"
            kind = {"revision": "info", "tree": "tree", "paths-info": "paths"}[what]
            if self._fault(
                self.server_state.fault_for(kind, path, head=not body), body=body, path=path
            ):
                return
            self._api(repo_id, what, rev)
        elif m := _RESOLVE.fullmatch(path):
            repo_id, rev, name = m.groups()
            if self._fault(
                self.server_state.fault_for("resolve", name, head=not body), body=body, path=path
            ):
                return
            self._resolve(repo_id, rev, name, body=body)
        else:
            self._send(404, b"not found", {"X-Error-Code": "RepoNotFound"})

    def _repo(self, repo_id: str, rev: str) -> tuple[Repo | None, str | None]:
        repo = self.server_state.repos.get(repo_id)
        if repo is None:
            self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            return None, None
        commit = {"main": repo.commit, repo.commit: repo.commit, **repo.refs}.get(rev)
        if commit is None:
            self._send(404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
            return None, None
        return repo, commit

    def _files(self, repo: Repo) -> list[dict[str, object]]:
        out = []
        for p in sorted(repo.folder.iterdir()):
            data = p.read_bytes()
            entry: dict[str, object] = {"path": p.name, "size": len(data)}
            entry["oid"] = git_blob_sha1(data)
            if p.name.endswith(".safetensors"):
                sha = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha, "sha256": sha, "size": len(data)}
                entry["lfs"]["pointerSize"] = 130  # type: ignore[index]
            out.append(entry)
        return out

    def _api(self, repo_id: str, what: str, rev: str) -> None:
        repo, commit = self._repo(repo_id, rev)
        if repo is None:
            return
        files = self._files(repo)
        if what == "revision":
            siblings = [
                {"rfilename": f["path"], "size": f["size"], "blobId": f["oid"]}
                | ({"lfs": f["lfs"]} if "lfs" in f else {})
                for f in files
            ]
            obj: object = {"id": repo_id, "sha": commit, "siblings": siblings}
        else:
            obj = [{"type": "file", **f} for f in files]
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, name: str, *, body: bool) -> None:
        repo, commit = self._repo(repo_id, rev)
        if repo is None:
            return
        p = repo.folder / name
        if not p.is_file():
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body=body)
            return
        data = p.read_bytes()
        headers = {"X-Repo-Commit": str(commit), "Accept-Ranges": "bytes"}
        if name.endswith(".safetensors"):
            sha = hashlib.sha256(data).hexdigest()
            headers |= {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
            headers["ETag"] = f'"{sha}"'
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        whole = body and not self.headers.get("Range")  # header reads stay clean
        corrupt = self.server_state.fault_for("corrupt", name) if whole else None
        if corrupt is not None:
            mid = len(data) // 2
            data = data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]
        status, rng = 200, self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        if body:
            with self.server_state._lock:
                self.server_state.served.append((name, rng, len(data)))
        self._send(status, data, headers, body=body)

    def _fault(self, fault: Fault | None, *, body: bool, path: str) -> bool:
        if fault is None:
            return False
        if fault.action == "status":
            extra = {"X-Error-Code": fault.error_code} if fault.error_code else {}
            if fault.status == 429:
                extra["Retry-After"] = "0"
            self._send(fault.status, b'{"error":"injected"}', extra, body=body)
        elif fault.action in ("stall", "stall-get"):
            time.sleep(min(fault.seconds, STALL_CAP_S))
            self.close_connection = True
        elif fault.action == "redirect-loop":
            self._send(302, b"", {"Location": path}, body=body)
        elif fault.action == "cut":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(b"\0" * 1000)
            self.close_connection = True
        else:  # "corrupt" is applied inside _resolve
            return False
        return True

    def _send(
        self, status: int, data: bytes, headers: dict[str, str], *, body: bool = True
    ) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
            with self.server_state._lock:
                self.server_state.bytes_sent += len(data)
