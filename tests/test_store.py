"""The SQLite store: real files, a writer thread, reads while it writes, and kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent


def test_records_round_trip_and_delete(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    try:
        store.record_session("s1", {"sample_rate": 48000, "config": {"chunk_seconds": 1.0}})
        for seq in range(5):
            fields = {"features": {"rms_dbfs": -20.0 - seq}, "transcript": {"text": f"w{seq}"}}
            store.record_entry("s1", seq, float(seq), float(seq + 1), fields)
        (store.audio_folder / "s1").mkdir(parents=True)
        (store.audio_folder / "s1" / "1.flac").write_bytes(b"fLaC")
        store.record_generation("s1", 1, {"prompt": {"text": "rain"}, "seed": 7}, "s1/1.flac")
        store.record_error("s1", {"type": "error", "code": "partial_frame", "message": "x"})
        store.record_end("s1", {"samples_received": 240000})
        assert store.flush()
        listed = store.sessions()
        assert [(s["id"], s["chunks"], s["generations"]) for s in listed] == [("s1", 5, 1)]
        whole = store.session("s1")
        assert whole is not None and whole["summary"] == {"samples_received": 240000}
        assert (
            whole["generations"][0]["seed"] == 7 and whole["errors"][0]["code"] == "partial_frame"
        )
        window = store.timeline("s1", 1.5, 3.0)
        assert [e["seq"] for e in window] == [1, 2]
        assert window[0]["transcript"]["text"] == "w1"
        assert store.generation_audio("s1", 1).read_bytes() == b"fLaC"
        assert store.delete("s1") and store.sessions() == []
        assert not (store.audio_folder / "s1" / "1.flac").exists() and not store.delete("s1")
    finally:
        store.close()


def test_writes_never_block_and_readers_see_committed_batches(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    try:
        store.record_session("s", {})
        started = time.perf_counter()
        for seq in range(20_000):
            store.record_entry("s", seq, seq * 0.02, (seq + 1) * 0.02, {"rms": seq})
        enqueue_s = time.perf_counter() - started
        seen = len(store.timeline("s", 0, 1e9))  # a reader while the writer works
        assert store.flush()
        assert len(store.timeline("s", 0, 1e9)) == 20_000 and 0 <= seen <= 20_000
        assert store.committed == 20_001 and store.dropped == 0
        assert enqueue_s < 5.0  # generous: enqueueing is a queue put, no I/O
    finally:
        store.close()


WRITER = """
import sys, time
from stream.store import SqliteStore
store = SqliteStore(sys.argv[1])
store.record_session("s", {})
seq = 0
while True:
    for _ in range(200):
        store.record_entry("s", seq, seq * 0.02, (seq + 1) * 0.02, {"n": seq, "pad": "x" * 200})
        seq += 1
    store.flush()
    print(store.committed - 1, flush=True)  # entries known durable
"""


@pytest.mark.parametrize("after", [0.3, 0.9])
def test_kill_9_under_write_load_keeps_the_database_whole(tmp_path: Path, after: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    durable = 0
    deadline = time.monotonic() + after
    for line in proc.stdout:
        durable = int(line)
        if time.monotonic() > deadline and durable > 0:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    db = sqlite3.connect(tmp_path / "grym.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count = db.execute("SELECT COUNT(*) FROM timeline WHERE session = 's'").fetchone()[0]
        seqs = db.execute("SELECT MIN(seq), MAX(seq) FROM timeline").fetchone()
    finally:
        db.close()
    # Nothing reported durable was lost, and what is there has no holes.
    assert count >= durable > 0
    assert seqs[0] == 0 and seqs[1] == count - 1
