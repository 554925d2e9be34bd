"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, serving repositories from
memory: enough of it for huggingface_hub's `model_info`, `snapshot_download` and
`hf_hub_download` (repository info, the recursive file tree, HEAD and GET of a file at a
commit). The hub itself is out of reach here; point a process at this with HF_ENDPOINT (read
when huggingface_hub is imported, so in a process started after it is set).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlparse


class LocalHub:
    """`with LocalHub({"org/name": {"path/in/repo": b"bytes"}}) as hub:` serves at hub.url;
    hub.fetched lists the files downloaded, in order."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.commits = {
            repo: hashlib.sha1(repr(sorted(files)).encode() + b"".join(files.values())).hexdigest()
            for repo, files in repos.items()
        }
        self.fetched: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path).strip("/").split("/")
                if path[:2] == ["api", "models"] and len(path) >= 4:
                    repo = "/".join(path[2:4])
                    if repo not in hub.repos:
                        return self._send(404, b'{"error": "Repository not found"}', body)
                    rest = path[4:]
                    if rest[:1] == ["tree"]:
                        return self._send(200, json.dumps(hub._tree(repo)).encode(), body)
                    return self._send(200, json.dumps(hub._info(repo)).encode(), body)
                if len(path) >= 5 and path[2] == "resolve":
                    repo, name = "/".join(path[:2]), "/".join(path[4:])
                    content = hub.repos.get(repo, {}).get(name)
                    if content is None:
                        return self._send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
                    if body:
                        hub.fetched.append(name)
                    etag = hashlib.sha1(content).hexdigest()
                    headers = {"X-Repo-Commit": hub.commits[repo], "ETag": f'"{etag}"'}
                    return self._send(200, content, body, headers)
                return self._send(404, b"", body)

            def _send(
                self, status: int, content: bytes, body: bool, headers: dict | None = None
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if body:
                    self.wfile.write(content)

        return Handler

    def _info(self, repo: str) -> dict:
        siblings = [{"rfilename": name} for name in sorted(self.repos[repo])]
        return {"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False,
                "siblings": siblings}  # fmt: skip

    def _tree(self, repo: str) -> list[dict]:
        return [
            {"type": "file", "path": name, "size": len(content),
             "oid": hashlib.sha1(content).hexdigest()}
            for name, content in sorted(self.repos[repo].items())
        ]  # fmt: skip
