"""benchmarks.analysis_kernels runs end to end in quick mode (tiny-random model): a smoke test of
the plumbing only. Timings on shared CI machines are noise, so nothing here asserts speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = {"torch-eager", "ort-fp32", "ort-fp32-opt", "ort-int8", "ort-int8+reuse"}


def run_quick(module: str, out: Path) -> subprocess.CompletedProcess[str]:
    """`python -m benchmarks.<module> --quick --out OUT`, offline. GRYM_CACHE_DIR comes from the
    environment (conftest points it at the checkout's cache, so the tiny artifacts made by other
    tests are reused)."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_analysis_kernels_quick(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    proc = run_quick("analysis_kernels", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contender | batch | median ms |" in proc.stdout
    assert "matmul reference" in proc.stdout
    assert "timing torch-eager, batch 1" in proc.stderr  # progress lines

    report = json.loads(out.read_text())
    assert report["model"] == "tiny-random"
    # Reuse skips the encoder over the context: fewer FLOPs, same transformer.
    assert 0 < report["flops_per_window_with_reuse"] < report["flops_per_window"]
    assert report["matmul_reference"]["gflops"] > 0
    rows = report["rows"]
    assert {r["contender"] for r in rows} == set(CONTENDERS)
    for row in rows:
        assert row["batch"] == 1 and row["runs"] == 5
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
        assert row["gflops"] > 0 and row["compute_s_per_audio_s"] > 0
        assert f"| {row['contender']} | 1 |" in proc.stdout


def test_analysis_capacity_quick(tmp_path: Path) -> None:
    """A real server process and live-paced clients of the public protocol, tiny-random model."""
    proc = run_quick("analysis_capacity", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "largest sustained level" in proc.stdout
    report = json.loads((tmp_path / "analysis_capacity-tiny-random-int8.json").read_text())
    assert [r["sessions"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        # 2.5 s per session in 1 s chunks: 3 events each, every one measured, none lost
        assert row["events"] == 3 * row["sessions"] and row["errors"] == 0
        assert row["p95_ms"] > 0


def test_generation_quick(tmp_path: Path) -> None:
    """diffusers' reference pipeline and ours, tiny preset, per-stage timings in the report."""
    out = tmp_path / "g.json"
    proc = run_quick("generation", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contender | steps | total s | first audio s |" in proc.stdout
    report = json.loads(out.read_text())
    names = [r["contender"] for r in report["rows"]]
    assert names == ["diffusers", "ours-ddim-fp32", "ours", "ours-1-steps"]
    for row in report["rows"]:
        assert 0 < row["first_audio_s"] <= row["total_s"]
        assert row["unet_step_s"] > 0 and row["vocoder_s"] > 0
    diffusers, ours = report["rows"][0], report["rows"][2]
    assert ours["text_s"] < 0.1 * diffusers["text_s"]  # ours reuses the cached prompt
    assert out.with_suffix(".png").is_file()


def test_generation_load_quick(tmp_path: Path) -> None:
    """A server process with both engines; live sessions with and without a generating one."""
    out = tmp_path / "gl.json"
    proc = run_quick("generation_load", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == ["idle", "generating"]
    for row in rows:  # 2 sessions x 4 s in 1 s chunks: every event measured, none skipped
        assert row["events"] == 8 and row["skipped"] == 0
    assert rows[1]["clips"] >= 1 and 0 < rows[1]["clip_first_audio_s"] <= rows[1]["clip_total_s"]
