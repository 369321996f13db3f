"""A loopback stand-in for the Hugging Face Hub, enough for huggingface_hub 2.4's client.

Serves what `HfApi.model_info(files_metadata=True)` and `hf_hub_download` ask for:

    GET  /api/models/{repo}[/revision/{rev}]   {"id", "sha", "siblings": [{rfilename, size, blobId, lfs?}]}
    HEAD /{repo}/resolve/{rev}/{file}          ETag, X-Repo-Commit, Content-Length (+ X-Linked-* for LFS)
    GET  /{repo}/resolve/{rev}/{file}          the bytes; honours "Range: bytes=N-" with 206

Unknown repos/files answer 404 with the X-Error-Code header the client maps to
its exceptions. `cut_next(file, n)` makes the next GET of that file send n
bytes and then drop the connection, once, to exercise resumption. Every
request is recorded in `requests` (method, path, Range header).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.support.live_server import free_port

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class HostedRepo:
    files: dict[str, bytes]
    sha: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha:
            h = hashlib.sha1()
            for name in sorted(self.files):
                h.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.sha = h.hexdigest()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _AsgiEndpoint:
    """Wraps a bound method so Starlette treats it as a raw ASGI app (it needs `send`)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class _CutConnection(Exception):
    """Raised mid-body: uvicorn then closes the socket, like a dropped network link."""


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, HostedRepo] = {}
        self.requests: list[Seen] = []
        self._cuts: dict[str, int] = {}
        self._delays: dict[str, float] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- content ----

    def add_repo(self, repo: str, files: dict[str, bytes]) -> HostedRepo:
        hosted = HostedRepo(dict(files))
        self.repos[repo] = hosted
        return hosted

    def add_dir(self, repo: str, directory: Path) -> HostedRepo:
        return self.add_repo(repo, {p.name: p.read_bytes() for p in sorted(directory.iterdir())
                                    if p.is_file()})

    def cut_next(self, filename: str, after_bytes: int) -> None:
        """The next GET of `filename` drops the connection after `after_bytes` bytes."""
        self._cuts[filename] = after_bytes

    def slow_next(self, filename: str, seconds: float) -> None:
        """The next GET of `filename` waits `seconds` before sending its body."""
        self._delays[filename] = seconds

    def gets(self, filename: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + filename)]

    # ---- HTTP ----

    def _info(self, request: Request) -> Response:
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        self.requests.append(Seen("GET", request.url.path, None))
        hosted = self.repos.get(repo)
        if hosted is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        siblings = []
        for name, data in sorted(hosted.files.items()):
            entry: dict[str, object] = {"rfilename": name, "size": len(data),
                                        "blobId": _git_blob_id(data)}
            if _is_lfs(name):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            siblings.append(entry)
        return JSONResponse({"_id": hosted.sha[:24], "id": repo, "modelId": repo, "sha": hosted.sha,
                             "private": False, "disabled": False, "gated": False,
                             "downloads": 0, "likes": 0, "tags": ["mlx"],
                             "lastModified": "2026-11-01T00:00:00.000Z", "siblings": siblings})

    async def _resolve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        p = request.path_params
        repo, filename = f"{p['org']}/{p['name']}", p["file"]
        range_header = request.headers.get("range")
        self.requests.append(Seen(request.method, request.url.path, range_header))
        hosted = self.repos.get(repo)
        if hosted is None:
            await Response(status_code=404, headers={"X-Error-Code": "RepoNotFound"})(scope, receive, send)
            return
        data = hosted.files.get(filename)
        if data is None:
            await Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})(scope, receive, send)
            return
        etag = hashlib.sha256(data).hexdigest() if _is_lfs(filename) else _git_blob_id(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": hosted.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if _is_lfs(filename):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        if range_header and range_header.startswith("bytes="):
            start_text, _, end_text = range_header[len("bytes="):].partition("-")
            start = int(start_text)
            end = int(end_text) if end_text else len(data) - 1
            body = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        if request.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        delay = self._delays.pop(filename, None)
        if delay:
            await asyncio.sleep(delay)
        cut = self._cuts.pop(filename, None)
        if cut is not None and cut < len(body):
            await send({"type": "http.response.body", "body": body[:cut], "more_body": True})
            raise _CutConnection(f"cut {filename} after {cut} bytes")
        await send({"type": "http.response.body", "body": body})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/models/{org}/{name}", self._info, methods=["GET"]),
            Route("/api/models/{org}/{name}/revision/{rev}", self._info, methods=["GET"]),
            Route("/{org}/{name}/resolve/{rev}/{file:path}", _AsgiEndpoint(self._resolve), methods=["GET", "HEAD"]),
        ])

    # ---- lifecycle ----

    def start(self) -> FakeHub:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="critical",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-hub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake hub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
