"""The benchmarks run end to end in quick mode (tiny models): `grym-stream bench --quick` against
real server processes, the kernel and generation benchmarks. Timings on shared CI machines are
noise, so nothing here asserts speed: only that every part measured what it says it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.load import STAGES

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = {"torch-eager", "ort-fp32", "ort-fp32-opt", "ort-int8", "ort-int8+reuse"}


def run_quick(module: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m benchmarks.<module> --quick --out OUT`, offline. GRYM_CACHE_DIR comes from the
    environment (conftest points it at the checkout's cache, so the tiny artifacts made by other
    tests are reused)."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out), *args],
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


def test_model_size_quick(tmp_path: Path) -> None:
    """Candidate sizes built, exported int8 and timed against tiny in the same rounds."""
    out = tmp_path / "s.json"
    proc = run_quick("model_size", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| architecture | parameters | GFLOP / window |" in proc.stdout
    rows = {r["architecture"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"tiny", "12-layers"}
    assert rows["tiny"]["cost_vs_tiny"] == 1.0 and rows["tiny"]["params"] == 4_531_744
    # Twice the layers: more parameters and more FLOPs per window than tiny.
    assert rows["12-layers"]["params"] > 1.5 * rows["tiny"]["params"]
    assert rows["12-layers"]["gflop_per_window"] > 1.3 * rows["tiny"]["gflop_per_window"]
    for row in rows.values():
        assert row["median_ms_per_window"] > 0 and row["cost_vs_tiny"] > 0
        assert f"| {row['architecture']} |" in proc.stdout


def test_ctc_decoding_quick(tmp_path: Path) -> None:
    """Greedy, beam and beam+LM over the shipped model's streamed log-probabilities."""
    out = tmp_path / "d.json"
    proc = run_quick("ctc_decoding", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| decoder | beam width | CER % | WER % | ms CPU per audio s |" in proc.stdout
    report = json.loads(out.read_text())
    rows = {(r["decoder"], r["width"]): r for r in report["rows"]}
    assert set(rows) == {("greedy", None), ("beam", 4), ("beam+lm", 4), ("beam", 8), ("beam+lm", 8)}
    assert report["sentences"] == 8 and report["audio_seconds"] > 10 and report["set"] == "unseen"
    for row in rows.values():
        assert 0 <= row["cer"] < 1 and row["ms_per_audio_s"] > 0
    # The unseen set by default: text the LM never saw. An LM of broad English must help there.
    assert rows[("beam+lm", 8)]["cer"] < rows[("greedy", None)]["cer"]
    assert out.with_suffix(".png").is_file()


def test_generation_quick(tmp_path: Path) -> None:
    """diffusers' reference pipeline and ours, tiny preset, per-stage timings in the report."""
    out = tmp_path / "g.json"
    proc = run_quick("generation", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| contender | steps | total s | first audio s |" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["contender"]: r for r in report["rows"]}
    approximations = [
        "1-steps",
        "guidance-until-0.5",
        "deep-cache-2",
        "deep-cache-3",
        "progressive-vae",
    ]
    assert list(rows) == ["diffusers", "ours-ddim-fp32", "ours"] + [
        f"ours+{name}" for name in approximations
    ]  # no compiled packages in this cache: the approximations go on top of `ours`
    for row in rows.values():
        assert 0 < row["first_audio_s"] <= row["total_s"]
        assert row["unet_step_s"] > 0 and row["vocoder_s"] > 0
    assert rows["ours"]["text_s"] < 0.1 * rows["diffusers"]["text_s"]  # the cached prompt
    # How far each DPM-Solver++ row is from the exact fp32 clip, against two seeds' distance
    assert report["seeds_distance"] > 0
    assert "distance" not in rows["diffusers"] and "distance" not in rows["ours-ddim-fp32"]
    for name in ["ours"] + [f"ours+{name}" for name in approximations]:
        far = rows[name]["distance"]
        if report["bf16"] or name not in ("ours", "ours+progressive-vae"):
            assert 0 < far
        else:  # no bf16 on this CPU: `ours` is the exact fp32 clip itself, and so is the
            # progressive VAE's (tiny's VAE sees no further than its 16 rows of context)
            assert 0 <= far < 1e-3
        assert rows[name]["distance_of_seeds"] == far / report["seeds_distance"]
        # an approximation's own distance, run in fp32 (no bf16 rounding in it)
        assert ("distance_fp32" in rows[name]) == (name != "ours")
    assert out.with_suffix(".png").is_file()


def test_bench_quick(tmp_path: Path) -> None:
    """`grym-stream bench --quick`: every section against real server processes, the report,
    the plots, and `--compare` of a run with itself."""
    proc = subprocess.run(
        [sys.executable, "-m", "grym", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "websocket: 2 live session(s) x 2 s ..." in proc.stdout  # progress as it runs
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["machine"]["versions"]["onnxruntime"] and result["settings"]["quick"] is True

    assert {r["contender"] for r in result["kernels"]["rows"]} == CONTENDERS
    sweep = result["sweep"]
    assert [r["sessions"] for r in sweep["rows"]] == [1, 2]
    for row in sweep["rows"] + result["transports"]["rows"]:
        # 2 s per session in 1 s chunks: every event arrived, was measured and was timed (over
        # WebRTC the client's 120 ms silent tail makes a third, short chunk)
        expected = 3 if row["transport"] == "webrtc" else 2
        assert row["events"] == expected * row["sessions"], row
        assert row["skipped"] == 0 and row["missing"] == 0 and not row["errors"]
        assert row["loop_lag"]["ticks"] > 0
        stages = row["stages_mean_ms"]
        server_side = sum(stages[k] for k in STAGES)
        assert abs(server_side - stages["server_ms"]) < 0.05  # the stages tile the server's time
        assert stages["inference_ms"] > 0
        assert abs(server_side + stages["transport_ms"] - row["mean_ms"]) < 0.05
    assert sweep["max_sustained_sessions"] == max(
        r["sessions"] for r in sweep["rows"] if r["sustained"]
    )
    assert [r["transport"] for r in result["transports"]["rows"]] == ["websocket", "webrtc"]
    echo = result["transports"]["echo"]
    assert echo["frames"] == 100 and 0 < echo["p50_ms"] <= echo["p99_ms"]

    tiny = result["generation"]["generators"]["tiny"]
    assert tiny["clips"] >= 1 and tiny["phases"]["generating"]["failed"] == 0
    for clip in tiny["phases"]["generating"]["clips"]:
        assert 0 < clip["first_audio_s"] <= clip["total_s"]
    assert tiny["phases"]["idle"]["events"] == 2
    # Alone on the server: the worker says what came after the last denoising step; diffusers'
    # recipe ran on the same clip for the ratio.
    assert tiny["alone"]["clips"] >= 1 and tiny["alone_streaming"]["clips"] >= 1
    for clip in tiny["phases"]["alone"]["clips"] + tiny["phases"]["alone_streaming"]["clips"]:
        assert 0 < clip["first_audio_after_denoising_s"] < clip["first_audio_s"] <= clip["total_s"]
        assert not clip["unet_compiled"]  # tiny runs eagerly: generation_compile auto
    assert tiny["diffusers"]["total_s"] > 0
    assert result["headline"]["speedup_vs_diffusers_tiny"] > 0

    # A continuous stream beside the live sessions: its segments kept up, and joined seamlessly.
    continuous = result["continuous"]["generators"]["tiny"]["phases"]
    made = continuous["continuous"]["stream"]
    assert made["segments"] >= 2 and made["outcome"] == "done", made
    assert made["realtime_factor_median"] > 0 and made["seam_ratio"] > 0
    assert made["settled"]["steps"] >= 1 and continuous["idle"]["events"] == 4
    assert continuous["alone"]["stream"]["segments"] >= 2

    summary = (tmp_path / "bench.md").read_text()
    assert "## Concurrency sweep (WebSocket)" in summary and "## Generation" in summary
    assert "## Continuous generation: one stream for 4 s, alone and beside 1" in summary
    assert "| generator | session | clips (UNet compiled) | first audio s |" in summary
    assert "| tiny | no audio |" in summary and "| tiny | streaming |" in summary
    assert tiny["alone"]["unet_s"] > 0 and tiny["alone"]["vocoder_s"] > 0
    for png in ("latency-cdf.png", "p95-vs-sessions.png", "stages.png", "continuous.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

    bench = tmp_path / "bench.json"
    compared = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--compare", str(bench), str(bench)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    best = f"{sweep['max_sustained_sessions']:.3f}"
    assert f"| max_sustained_sessions | {best} | {best} | 1.00x |" in compared.stdout
    assert "| rtf_ort-int8 |" in compared.stdout
