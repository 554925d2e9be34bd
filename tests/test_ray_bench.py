"""`grym-stream bench --sections ray` runs end to end in quick mode (tiny model, seconds of audio):
a real one-node Ray cluster, a real `--inference local` and a real `--inference ray` server, real
clients. Timings on a shared machine are noise, so nothing here asserts speed: only that every
figure was measured. And BENCHMARKS.md quotes the committed full run (benchmarks/results/ray/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ray_serve, report

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "results" / "ray"


def test_ray_section_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "grym", "bench", "--quick", "--sections", "ray", "--out",
         str(tmp_path)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ray overhead, round 1: `ray`, 1 live session(s) x 2 s ..." in proc.stdout
    assert "ray: capacity of `local` ..." in proc.stdout

    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["quick"] is True and result["settings"]["sections"] == ["ray"]
    assert set(result) >= {"ray", "headline"} and "sweep" not in result
    ray = result["ray"]
    assert ray["replicas"] == 1 and ray["cluster_cpus"] >= 4 and ray["ray_version"]

    [level] = ray["overhead"]["levels"]
    assert level["sessions"] == 1
    for name in ("local", "ray"):
        setup = level[name]
        # 2 s in 1 s chunks: every event arrived, was measured and carried wav2vec2's timing
        assert setup["events"] == 2 and setup["skipped"] == setup["missing"] == 0
        assert setup["errors"] == 0
        for q in ("p50", "p95"):
            assert setup["inference_ms"][q] > 0 and setup["latency_ms"][q] > 0
        assert setup["inference_ms"]["p50"] <= setup["inference_ms"]["p95"]
        assert setup["cpu_ms_per_window"]["server"] > 0
        assert setup["cpu_ms_per_window"]["ray_cluster"] >= 0
    local, remote = level["local"], level["ray"]
    assert "transfer_ms" not in local  # in-process: no remote split
    for key in ("transfer_ms", "replica_queue_ms", "replica_inference_ms", "ray_added_ms"):
        assert remote[key]["p95"] >= remote[key]["p50"] >= 0, key
    assert remote["replica_inference_ms"]["p50"] > 0 and remote["replica_batch"]["mean"] >= 1
    # the call holds the replica's model run, and the difference is what Ray added
    assert remote["inference_ms"]["p50"] >= remote["replica_inference_ms"]["p50"]
    for q in ("p50", "p95"):
        want = remote["inference_ms"][q] - local["inference_ms"][q]
        assert level["overhead_ms"][q] == pytest.approx(want)

    for name in ("local", "ray"):
        capacity = ray["capacity"][name]
        assert [r["sessions"] for r in capacity["rows"]] == [1, 2]  # quick: --levels 1 2
        assert capacity["max_sustained_sessions"] >= 1
        for row in capacity["rows"]:
            assert row["events"] == 2 * row["sessions"] and row["p95_ms"] > 0
            assert row["stages_mean_ms"]["inference_ms"] > 0
    assert ray["capacity_ratio"] > 0

    headline = result["headline"]
    assert headline["ray_overhead_p50_ms_1_sessions"] == level["overhead_ms"]["p50"]
    assert headline["ray_section_max_sustained_ray"] >= 1
    summary = (tmp_path / "bench.md").read_text()
    assert summary == report.markdown(result) + ray_serve.markdown(result)
    assert "## Models on Ray Serve (`--inference ray`)" in summary
    assert "| ray | 2 | 4 |" in summary  # 2 sessions, 4 events


def test_benchmarks_md_quotes_the_committed_ray_run() -> None:
    result = json.loads((RUN / "bench.json").read_text())
    assert result["settings"]["quick"] is False and "ray" in result
    assert json.dumps(report.headline(result) | ray_serve.headline(result)) == json.dumps(
        result["headline"]
    )
    tables = (RUN / "bench.md").read_text()
    assert tables == report.markdown(result) + ray_serve.markdown(result)
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    assert f"`{result['command']}`" in benchmarks
    for line in tables.splitlines():
        if line.startswith("|"):
            assert line in benchmarks, f"BENCHMARKS.md does not quote: {line}"
