"""The scale-out benchmark runs end to end in quick mode (tiny model, seconds of audio): real
front-end processes, a real PostgreSQL and HAProxy. Timings on a shared machine are noise, so
nothing here asserts speed: only that every part measured what it says it measured."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_scaleout_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaleout", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round 1: (d) 2 front-ends, PostgreSQL, HAProxy" in proc.stdout  # progress lines
    result = json.loads((tmp_path / "scaleout.json").read_text())
    assert result["settings"]["quick"] is True
    assert (tmp_path / "scaleout.md").read_text() in proc.stdout

    # 1. Latency: every setup ran its sessions to the end, each with all its samples.
    latency = result["latency"]
    sessions = latency["sessions"]
    assert set(latency["setups"]) == {"a", "b", "c", "d"}
    for key, setup in latency["setups"].items():
        assert setup["sessions_run"] == sessions * latency["rounds"]
        assert setup["sessions_whole"] == setup["sessions_run"], key
        assert setup["events"] > 0 and setup["errors"] == []
        for field in ("p50_ms", "p95_ms", "mean_ms", "server_mean_ms", "transport_mean_ms"):
            assert finite(setup[field]) and setup[field] >= 0, (key, field)
        assert setup["p95_ms"] >= setup["p50_ms"]
        for run in setup["rounds"]:
            for end in run["ends"]:
                assert end["ended"] and end["samples_received"] == end["samples_sent"] > 0
                assert end["close_code"] == 1000
        assert (setup["writes"] is None) == (setup["store"] == "sqlite")
    assert latency["setups"]["d"]["frontends"] == 2 and latency["setups"]["c"]["balancer"]
    for share in ("postgresql", "balancer", "second_frontend"):
        assert all(finite(v) for v in latency["shares"][share].values())

    # 2. PostgreSQL's work per session: something was written, and scaled up on paper.
    writes = result["writes"]
    assert writes["session_seconds"] > 0
    per = writes["per_session"]
    assert per["transactions_per_s"] > 0 and per["rows_per_s"] > 0 and per["wal_kb_per_s"] > 0
    estimate = writes["estimate"]
    assert estimate["sessions"] == 10_000
    assert estimate["wal_mb_per_s"] == per["wal_kb_per_s"] * 10_000 / 1024
    if "cores" in estimate:  # from the committed full bench run
        assert estimate["cores"] > 0 and estimate["sessions_per_core"] > 0

    # 3. Failover: the session moved to the other front-end and ended whole, each time.
    failover = result["failover"]
    assert failover["lease_seconds"] == 2.0
    for how in ("sigkill", "sigterm"):
        runs = failover[how]["runs"]
        assert len(runs) == result["settings"]["repeats"]
        for run in runs:
            assert run["from"] != run["to"] and run["to"] in ("edge-1", "edge-2")
            assert run["resumes"] >= 1
            assert run["whole"] and run["chunks"] and run["close_code"] == 1000
            assert run["samples_received"] == run["samples_sent"]
            assert 0 < run["to_ready_s"] <= run["to_first_event_s"] <= run["to_first_new_chunk_s"]
        assert failover[how]["median_to_first_event_s"] > 0
    assert all(finite(v) for v in result["headline"].values())
