"""A loopback stand-in for the Hugging Face Hub: serves fixture repositories in the Hub's URL layout, so that
the real huggingface_hub client code runs against it (HF_ENDPOINT points here)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]  # at the branch's commit
    revisions: dict[str, str]  # branch or tag -> commit sha
    token: str | None = None  # set: gated, only this token may read it
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # other commits' sha -> their files
    etags: dict[str, str] = field(default_factory=dict)  # file -> the ETag header sent for it (a hostile Hub)

    def files_at(self, sha: str) -> dict[str, bytes]:
        return self.commits.get(sha, self.files)


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, auth header
    url: str = ""

    def add_repo(self, repo_id: str, directory: Path, *, branch: str = "main", token: str | None = None) -> str:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        sha = hashlib.sha1(b"".join(files.values())).hexdigest()
        self.repos[repo_id] = Repo(files=files, revisions={branch: sha, sha: sha}, token=token)
        return sha

    def add_commit(self, repo_id: str, directory: Path, *names: str) -> str:
        """Another commit of ``repo_id`` (an older one, say) with the files of ``directory``, also reachable by
        ``names`` (tags or branches); the repository's branch keeps its own files."""
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        sha = hashlib.sha1(b"commit " + b"".join(files.values())).hexdigest()
        repo = self.repos[repo_id]
        repo.commits[sha] = files
        repo.revisions.update({name: sha for name in (*names, sha)})
        return sha


def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
    return "/".join(parts[:2]), parts[2:]


class _Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args: object) -> None:
        pass

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            if self.headers.get("Authorization") is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                              "authorized list.")
            return None
        return repo

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Authorization")))
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"]:
            repo_id, rest = _split_repo(parts[2:])
            repo = self._repo(repo_id)
            if repo is None:
                return
            revision = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
            sha = repo.revisions.get(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            files = repo.files_at(sha)
            if rest[:1] == ["tree"]:
                self._json([{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for n, b in files.items()])
                return
            self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                        "gated": "manual" if repo.token else False,
                        "siblings": [{"rfilename": n, "size": len(b)} for n, b in files.items()]})
            return
        repo_id, rest = _split_repo(parts)
        if len(rest) < 3 or rest[0] != "resolve":
            self._error(404, "EntryNotFound", f"not found: {path}")
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        revision, filename = rest[1], "/".join(rest[2:])
        sha = repo.revisions.get(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        if filename not in repo.files_at(sha):
            self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}")
            return
        self._send_file(repo, sha, filename)

    def _send_file(self, repo: Repo, sha: str, filename: str) -> None:
        body = repo.files_at(sha)[filename]
        start = 0
        if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", repo.etags.get(filename, f'"{hashlib.sha256(body).hexdigest()}"'))
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[start:])


@contextmanager
def serve_hub(hub: Hub, handler_class: type[_Handler] = _Handler) -> Iterator[Hub]:
    handler = type("Handler", (handler_class,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
