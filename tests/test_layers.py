"""The direction of imports, enforced: a module may import only from the layers its own layer
sits on (docs/architecture.md draws them). Imports inside functions count too.

    grym.cli (the one module that knows the server, the clients and the benchmarks)
      stream.cli -> stream.web -> stream.wiring -> stream.transports -> stream.session
      -> stream.engines -> model runners;  every stream layer -> config/infrastructure -> core
    the session layer reads the models' data types only; config reads models.base only
    clients -> stream.core, stream.protocol;  models.training -> stream.core;  models -> models
    models.training: only benchmarks and grym use it (the server never trains)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grym", "stream", "models", "clients", "benchmarks")

# Config and infrastructure: below the session layer, above the core.
SUPPORT = (
    "stream.protocol", "stream.settings", "stream.pipeline", "stream.plugins", "stream.store",
    "stream.metrics", "stream.logs", "stream.retry",
)  # fmt: skip
CORE = ("stream.core",)
MODEL_TYPES = ("models.base", "models.generation", "models.frames", "models.char_lm")
RUNNERS = ("models",)  # any model module; models.training is refused separately (TRAINING)
SESSION = ("stream.session",)
# A layer (module prefix, most specific first) and the project modules it may import. Each
# module may always import its own package (`stream` itself only holds the version).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("stream.core", CORE),
    *[(name, (*CORE, *SUPPORT, "models.base")) for name in SUPPORT],
    ("stream.engines", (*CORE, *SUPPORT, *RUNNERS)),
    ("stream.session", (*CORE, *SUPPORT, "stream.engines", *MODEL_TYPES)),
    ("stream.transports", (*CORE, *SUPPORT, *SESSION)),
    ("stream.wiring", (*CORE, *SUPPORT, "stream.engines", *SESSION, *RUNNERS)),
    ("stream.web", (*CORE, *SUPPORT, *SESSION, *RUNNERS, "stream.transports", "stream.wiring")),
    ("stream.cli", (*SUPPORT, *RUNNERS, "stream.web", "stream.wiring")),
    ("stream.__main__", ("stream.cli",)),
    ("stream", ()),
    ("models.training", ("models", "stream.core")),
    ("models", ("models",)),
    ("clients", ("stream.core", "stream.protocol")),
    ("benchmarks", PACKAGES),
    ("grym", PACKAGES),
]
TRAINING = "models.training"
TRAINING_USERS = ("models.training", "benchmarks", "grym")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module of this project that `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: a relative import; this project imports absolutely")
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from stream.core.steps import patterns` imports the module stream.core.steps.patterns
            names = [
                f"{node.module}.{alias.name}"
                if is_module(f"{node.module}.{alias.name}", root)
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str) -> tuple[str, tuple[str, ...]]:
    for prefix, allowed in LAYERS:
        if within(module, prefix):
            return prefix, allowed
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def within_any(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(within(module, prefix) for prefix in prefixes)


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            prefix, allowed = layer_of(module)
            for imported in sorted(project_imports(path, root)):
                if within(imported, TRAINING) and not within_any(module, TRAINING_USERS):
                    found.append(f"{module} imports {imported} (the training recipe)")
                elif imported == "stream" or within(imported, prefix):
                    continue  # the version string, or its own layer
                elif not within_any(imported, allowed):
                    found.append(f"{module} imports {imported} (layer {prefix})")
    return found


def test_imports_follow_the_layers() -> None:
    found = violations()
    assert not found, "imports against the layers:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("stream/core/audio/pcm.py", "from stream.session import Session"),
        ("stream/session/outbox.py", "from stream.transports.websocket import stream_endpoint"),
        ("stream/transports/websocket.py", "from stream.engines.analysis import AnalysisEngine"),
        ("stream/web/health.py", "from clients.stream_client import StreamClient"),
        ("models/dsp.py", "from stream.protocol import CloseCode"),
        ("clients/mic.py", "from stream.session.outbox import Outbox"),
        ("stream/session/analysis.py", "from models.dsp import DspAnalyser"),
        ("stream/web/server.py", "from models.training.train import train"),
    ],
)
def test_a_deliberate_violation_is_caught(tmp_path: Path, module: str, line: str) -> None:
    """The check can fail: a copy of the tree with one import added breaks it."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    planted = tmp_path / module
    planted.write_text(planted.read_text() + f"\n\ndef _planted() -> None:\n    {line}\n")
    found = violations(tmp_path)
    name = module_name(ROOT / module)
    assert found and all(item.startswith(f"{name} imports ") for item in found), found
