"""wav2vec2 -> ONNX artifacts: presets, loading, export variants, verification, cache, CLI.

Only the tiny-random preset (and checkpoints saved from it) is used, with caches in tmp folders:
the whole module runs in ~20 s on 2 cores and never touches the network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models import export as export_mod
from models import presets, wav2vec2, wav2vec2_checkpoint
from models.export import ensure_artifact, list_artifacts, verify_artifact
from models.presets import (
    BASE_HUB_ID,
    SHIPPED_TINY,
    ExportVerificationError,
    ModelLoadError,
    checkpoint_key,
    resolve_model,
)
from models.wav2vec2 import TorchForward
from models.wav2vec2_checkpoint import load_torch_model
from models.wav2vec2_runtime import Wav2Vec2Graphs


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the hub: offline, with an empty private HF cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding all three tiny variants (int8 makes its parents on the way)."""
    root = tmp_path_factory.mktemp("cache")
    assert not ensure_artifact("tiny-random", "int8", cache_dir=root, progress=False).reused
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a local checkpoint (safetensors)."""
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-ckpt"
    load_torch_model(resolve_model("tiny-random")).model.save_pretrained(folder)
    return folder


def frames(samples: int) -> int:
    return (samples - 400) // 320 + 1


@pytest.mark.parametrize("variant", ["fp32", "fp32-opt", "int8"])
def test_variant_agrees_with_pytorch_on_new_shapes(cache: Path, variant: str) -> None:
    artifact = ensure_artifact("tiny-random", variant, cache_dir=cache, progress=False)
    assert artifact.reused and artifact.meta["verification"]["passed"]
    graphs = Wav2Vec2Graphs(artifact.folder, threads=1)
    assert [i.name for i in graphs.encoder.get_inputs()] == ["audio"]
    assert [o.name for o in graphs.encoder.get_outputs()] == ["features"]
    assert [i.name for i in graphs.transformer.get_inputs()] == ["features"]
    assert graphs.output_names == ["hidden", "logits"]
    wrapper = TorchForward(load_torch_model(artifact.spec)).eval()
    # Shapes unlike the traced (2, 16000) and the verification cases, down to a single frame.
    for batch, samples in [(3, 8000), (1, 400), (4, 16080)]:
        audio = np.random.default_rng(samples).standard_normal((batch, samples), dtype=np.float32)
        outputs = graphs.run(audio)
        hidden, logits = outputs["hidden"], outputs["logits"]
        with torch.no_grad():
            ref_hidden, ref_logits = (t.numpy() for t in wrapper(torch.from_numpy(audio)))
        n = frames(samples)
        assert logits.shape == (batch, n, 32) and hidden.shape == (batch, n, 64)
        if variant == "int8":
            norms = np.linalg.norm(hidden, axis=-1) * np.linalg.norm(ref_hidden, axis=-1)
            cosine = (hidden * ref_hidden).sum(-1) / norms
            assert cosine.mean() >= wav2vec2.INT8_FLOORS["hidden_cosine"]
        else:
            assert np.abs(logits - ref_logits).max() < wav2vec2.FP32_TOLERANCE


def test_verification_report_numbers(cache: Path) -> None:
    reports = {m["variant"]: m["verification"] for m in list_artifacts(cache)}
    assert set(reports) == {"fp32", "fp32-opt", "int8"}
    for variant in ("fp32", "fp32-opt"):
        assert reports[variant]["max_abs"] < 1e-4  # measured ~1e-6
        assert [c["shape"] for c in reports[variant]["cases"]] == [[2, 20800], [1, 11200]]
    int8 = reports["int8"]
    # measured 0.99997 / 0.984
    assert int8["hidden_cosine"] >= 0.999 and int8["argmax_agreement"] >= 0.9
    assert 0 < int8["max_abs"] < 0.1


def test_optimizer_fused_attention_layernorm_gelu(cache: Path) -> None:
    meta = {m["variant"]: m for m in list_artifacts(cache)}
    stats = meta["fp32-opt"]["fused_operators"]
    # Measured on tiny (2 layers): Attention 2, SkipLayerNormalization 5, BiasGelu 2.
    assert meta["fp32-opt"]["optimizer_model_type"] == "clip"
    assert stats["Attention"] == 2 and stats["BiasGelu"] == 2
    assert stats["SkipLayerNormalization"] >= 4

    def ops(variant: str, graph: str) -> set[str]:
        model = onnx.load(str(Path(meta[variant]["path"], graph)))
        return {node.op_type for node in model.graph.node}

    assert "Attention" in ops("fp32-opt", "transformer.onnx")
    assert "MatMul" in ops("fp32", "transformer.onnx")
    assert {"QAttention", "MatMulInteger"} <= ops("int8", "transformer.onnx")
    # SkipLayerNormalization is undone after quantisation (export._unfuse_skip_layer_norm).
    assert "SkipLayerNormalization" not in ops("int8", "transformer.onnx")
    assert meta["int8"]["unfused_skip_layer_norms"] == stats["SkipLayerNormalization"]
    # The conv encoder is the same fp32 graph in every variant (Conv is not quantized).
    assert "Conv" in ops("int8", "encoder.onnx") and "ConvInteger" not in ops(
        "int8", "encoder.onnx"
    )
    sizes = {v: m["file_sizes"] for v, m in meta.items()}
    assert sizes["int8"]["transformer.onnx"] < sizes["fp32-opt"]["transformer.onnx"]
    assert sizes["int8"]["encoder.onnx"] == sizes["fp32"]["encoder.onnx"]


def test_meta_describes_the_model(cache: Path) -> None:
    meta = ensure_artifact("tiny-random", "fp32", cache_dir=cache, progress=False).meta
    assert meta["head"] == "ctc" and meta["trained"] is False and meta["do_normalize"] is True
    assert meta["vocab"][:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"] and len(meta["vocab"]) == 32
    assert meta["blank_id"] == 0 and meta["word_delimiter"] == "|"
    assert meta["conv_kernel"] == [10, 3, 3, 3, 3, 2, 2]
    assert meta["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]
    assert meta["opset"] == 17
    assert set(meta["versions"]) == {"torch", "transformers", "onnx", "onnxruntime"}
    assert meta["checkpoint_key"].startswith("tiny-random:0:")


def test_cache_reuse_does_not_export_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {
        str(graph): graph.stat().st_mtime_ns
        for m in list_artifacts(cache)
        for graph in Path(m["path"]).glob("*.onnx")
    }
    assert len(before) == 6

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-exported a cached artifact")

    monkeypatch.setattr(wav2vec2, "export_onnx", forbidden)
    monkeypatch.setattr(wav2vec2_checkpoint, "load_torch_model", forbidden)
    for variant in ("fp32", "fp32-opt", "int8"):
        assert ensure_artifact("tiny-random", variant, cache_dir=cache, progress=False).reused
    assert {p: Path(p).stat().st_mtime_ns for p in before} == before


def test_reuse_needs_no_torch(cache: Path) -> None:
    code = (
        "import sys; from models.export import ensure_artifact; "
        f"a = ensure_artifact('tiny-random', 'int8', cache_dir={str(cache)!r}, progress=False); "
        "assert a.reused; assert 'torch' not in sys.modules; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_failed_verification_caches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(loaded: object, path: Path, variant: str, options: object = None) -> dict:
        raise ExportVerificationError("simulated disagreement", {"max_abs": 1.0})

    monkeypatch.setattr(wav2vec2, "verify_onnx", failing)
    with pytest.raises(ExportVerificationError):
        ensure_artifact("tiny-random", "fp32", cache_dir=tmp_path, progress=False)
    assert list_artifacts(tmp_path) == []
    assert not list(tmp_path.glob("onnx/*/*-opset*")) and not list(tmp_path.glob("onnx/*/.tmp-*"))


def test_concurrent_exports_make_one_artifact(tmp_path: Path) -> None:
    results: list[bool] = []

    def export() -> None:
        results.append(
            ensure_artifact("tiny-random", "fp32", cache_dir=tmp_path, progress=False).reused
        )

    threads = [threading.Thread(target=export) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False, True]
    assert len(list(tmp_path.glob("onnx/*/fp32-*"))) == 1


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRYM_CACHE_DIR", str(tmp_path / "grym"))
    assert export_mod.default_cache_dir() == tmp_path / "grym"


def test_checkpoint_key_follows_local_weights(tiny_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder)
    spec = resolve_model(str(folder))
    assert spec.head == "ctc" and spec.trained and spec.source == str(folder.resolve())
    key = checkpoint_key(spec)
    assert key == checkpoint_key(resolve_model(str(folder))) and key.startswith("ckpt@sha256:")
    weights = load_file(folder / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_key(resolve_model(str(folder))) != key
    # A relative name is looked up under --model-dir.
    assert resolve_model("ckpt", model_dir=str(tmp_path)).path == str(folder.resolve())


def test_local_checkpoint_loads_with_its_vocab(tiny_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "with-vocab"
    shutil.copytree(tiny_folder, folder)
    (folder / "vocab.json").write_text('{"<pad>": 0, "<s>": 1, "a": 2}')
    (folder / "preprocessor_config.json").write_text('{"do_normalize": false}')
    loaded = load_torch_model(resolve_model(str(folder)))
    assert loaded.vocab == ["<pad>", "<s>", "a"] and loaded.blank_id == 0
    assert loaded.do_normalize is False and not loaded.model.training


def test_pickle_checkpoint_loads_with_a_warning(
    tiny_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_folder / "config.json", folder)
    model = load_torch_model(resolve_model("tiny-random")).model
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_torch_model(resolve_model(str(folder)))
    assert "pickle" in caplog.text and "weights_only=True" in caplog.text
    weight = next(iter(model.state_dict()))
    assert torch.equal(loaded.model.state_dict()[weight], model.state_dict()[weight])


def _bad(kind: str, tiny_folder: Path, root: Path) -> str:
    folder = root / kind
    if kind == "missing":
        return str(folder)
    if kind in ("garbage-safetensors", "garbage-pickle", "no-weights"):
        folder.mkdir()
        shutil.copy(tiny_folder / "config.json", folder)
        name = {"garbage-safetensors": "model.safetensors", "garbage-pickle": "pytorch_model.bin"}
        if kind in name:
            (folder / name[kind]).write_bytes(b"not weights at all" * 64)
        return str(folder)
    folder.mkdir()
    if kind == "bert":
        (folder / "config.json").write_text(
            '{"model_type": "bert", "architectures": ["BertModel"]}'
        )
    return str(folder)  # "empty": nothing in it


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("empty", "has no config.json"),
    ("bert", "'bert' model, not a wav2vec2-family"),
    ("garbage-safetensors", "could not load the safetensors weights"),
    ("garbage-pickle", "weights-only pickle"),
    ("no-weights", "has no weights"),
])  # fmt: skip
def test_bad_checkpoints_raise_clear_errors(
    kind: str, message: str, tiny_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_torch_model(resolve_model(_bad(kind, tiny_folder, tmp_path)))


def test_unknown_hub_id_offline_says_how_to_fix() -> None:
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set.*built-in tiny preset"):
        resolve_model("nobody/no-such-wav2vec2")


def test_auto_falls_back_to_the_shipped_tiny_model_offline() -> None:
    spec = resolve_model("auto")
    assert spec.name == "tiny" and spec.preset == "tiny" and spec.trained
    assert spec.path == str(SHIPPED_TINY) and "synthetic speech only" in spec.note
    assert "tiny" in spec.reason and "HF_HUB_OFFLINE" in spec.reason and BASE_HUB_ID in spec.reason


def test_tiny_random_is_labelled_untrained() -> None:
    spec = resolve_model("tiny-random")
    assert not spec.trained and spec.config is not None and "random weights" in spec.note


def test_a_missing_shipped_model_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(presets, "SHIPPED_TINY", tmp_path / "gone")
    with pytest.raises(ModelLoadError, match="shipped tiny model is missing.*tiny-random"):
        resolve_model("tiny")


def test_base_from_local_hub_cache(tiny_folder: Path, tmp_path: Path) -> None:
    """A snapshot laid out as huggingface_hub caches it is used offline, keyed by its commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / f"models--{BASE_HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = resolve_model("auto")
    assert spec.preset == "base" and spec.trained and "available" in spec.reason
    assert checkpoint_key(spec) == f"{BASE_HUB_ID}@{commit}"
    assert load_torch_model(resolve_model("base")).head == "ctc"


@pytest.mark.parametrize("head", ["classification", "base"])
def test_other_heads_export(head: str, tmp_path: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification, Wav2Vec2Model

    config = Wav2Vec2Config(**resolve_model("tiny-random").config, num_labels=3)
    model_class = Wav2Vec2ForSequenceClassification if head == "classification" else Wav2Vec2Model
    model_class._from_config(config, attn_implementation="eager").save_pretrained(tmp_path / head)
    artifact = ensure_artifact(str(tmp_path / head), "fp32", cache_dir=tmp_path, progress=False)
    assert artifact.meta["head"] == head and artifact.meta["verification"]["passed"]
    outputs = Wav2Vec2Graphs(artifact.folder, threads=1).run(np.zeros((2, 4000), np.float32))
    if head == "classification":
        assert list(outputs) == ["hidden", "class_logits"]
        assert outputs["class_logits"].shape == (2, 3)
        assert artifact.meta["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    else:
        assert list(outputs) == ["hidden"]
        assert artifact.meta["vocab"] is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream", "models", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_export_all_then_list(tmp_path: Path) -> None:
    done = _cli(
        "export", "--model", "tiny-random", "--variant", "all", "--cache-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert "exporting fp32" in done.stderr and "fused operators" in done.stderr
    listed = _cli("list", "--cache-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.strip().splitlines()
    assert rows[0].split()[:4] == ["model", "variant", "head", "trained"] and len(rows) == 4
    assert [row.split()[1] for row in rows[1:]] == ["fp32", "fp32-opt", "int8"]
    assert "Attn:2" in rows[2]


def test_cli_load_error_exits_2_without_traceback(tmp_path: Path) -> None:
    done = _cli("export", "--model", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_cli_verify(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream.cli import main

    common = ["--model", "tiny-random", "--quiet"]
    assert main(["models", "verify", "--variant", "all", "--cache-dir", str(cache), *common]) == 0
    assert "int8      ok" in capsys.readouterr().out
    assert verify_artifact("tiny-random", "fp32", cache_dir=cache, progress=False)["passed"]

    def failing(loaded: object, path: Path, variant: str, options: object = None) -> dict:
        raise ExportVerificationError("simulated", {"max_abs": 1.0})

    monkeypatch.setattr(wav2vec2, "verify_onnx", failing)
    assert main(["models", "verify", "--cache-dir", str(cache), *common]) == 1
    assert main(["models", "verify", "--cache-dir", str(cache / "empty"), *common]) == 2
