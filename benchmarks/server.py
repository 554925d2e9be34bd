"""A real server process for benchmarks: `python -m stream serve` on an ephemeral port, and the
flags `grym-stream bench` starts its servers with.

Benchmarks measure the server as its users meet it, so they start it as a separate process (its
own event loop, its own GIL) and talk to it through the public protocol only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def server_process(*serve_args: str) -> Iterator[str]:
    """Starts `python -m stream serve --port 0 <serve_args>` offline; yields its WebSocket URL
    once uvicorn listens, and stops it on exit."""
    with running_server(*serve_args) as (url, _):
        yield url


@contextmanager
def running_server(*serve_args: str, code: Path | None = None) -> Iterator[tuple[str, int]]:
    """server_process, yielding its URL and its pid (to read its CPU time); stopped with
    SIGTERM (a graceful stop). `code`: a checkout whose `stream` package runs instead of this
    one (a git worktree of another commit, in the same environment)."""
    command = [sys.executable, "-m", "stream", "serve", "--port", "0", "--log-level", "info"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)  # ahead of the editable install's path
    proc = subprocess.Popen(
        [*command, *serve_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=code,
    )  # fmt: skip
    assert proc.stdout is not None
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                # Drain the log in the background so a full pipe never stalls the server.
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                yield f"ws://127.0.0.1:{match.group(1)}/v1/stream", proc.pid
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(output))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # never leave a server behind
            proc.kill()
            proc.wait(10)


@contextmanager
def serving(args: argparse.Namespace, *flags: str) -> Iterator[str]:
    """A fresh server process with these flags, or the server at `--url` as it is."""
    if args.url:
        yield args.url
    else:
        with server_process(*flags) as url:
            yield url


def analysis_flags(args: argparse.Namespace) -> list[str]:
    """The bench's analysis settings as `serve` flags."""
    return [
        "--analysis-model", args.model, "--analysis-variant", args.variant,
        *(["--analysis-threads", str(args.threads)] if args.threads else []),
        *(["--analysis-encoder", "int8"] if args.economy else []),
        "--max-sessions", "512",
        *shlex.split(args.serve_args),
    ]  # fmt: skip
