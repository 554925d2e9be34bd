"""`grym-stream models export | list | verify`: make, show and re-check cached ONNX artifacts.

Exit codes: 0 ok, 1 an artifact failed verification against PyTorch, 2 the model could not be
resolved or loaded (the message says why; no traceback, these are user errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from models.export import VARIANTS

EXIT_OK, EXIT_VERIFY, EXIT_LOAD = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `models` on the top-level subparsers; each action sets `func(args) -> int`."""
    models = subparsers.add_parser("models", help="export, list and verify ONNX model artifacts")
    actions = models.add_subparsers(dest="models_command", required=True)

    def common(parser: argparse.ArgumentParser, variants: tuple[str, ...]) -> None:
        parser.add_argument(
            "--model",
            default="tiny",
            help="tiny (default) | tiny-random | base | base-random | auto | a hub id | a folder",
        )
        parser.add_argument(
            "--variant", choices=variants, default="fp32", help="artifact variant (default: fp32)"
        )
        parser.add_argument(
            "--model-dir",
            default=None,
            help="folder where relative model names are looked up first",
        )
        parser.add_argument(
            "--cache-dir",
            default=None,
            help="artifact cache (default: $GRYM_CACHE_DIR or ~/.cache/grym-stream)",
        )
        parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    export = actions.add_parser("export", help="export (or reuse) and verify ONNX artifacts")
    common(export, (*VARIANTS, "all"))
    export.set_defaults(func=_export)
    verify = actions.add_parser("verify", help="re-check cached artifacts against PyTorch")
    common(verify, (*VARIANTS, "all"))
    verify.set_defaults(func=_verify)
    listing = actions.add_parser("list", help="show cached artifacts")
    listing.add_argument("--cache-dir", default=None)
    listing.add_argument("--json", action="store_true", help="one meta.json object per line")
    listing.set_defaults(func=_list)
    return models


def _variants(choice: str) -> tuple[str, ...]:
    return VARIANTS if choice == "all" else (choice,)


def _summary(report: dict[str, Any]) -> str:
    parts = [
        f"max |Δ{report['checked_output']}| {report['max_abs']:.2e}",
        f"hidden cosine {report['hidden_cosine']:.5f}",
    ]
    if report.get("argmax_agreement") is not None:
        parts.append(f"argmax agreement {report['argmax_agreement']:.3f}")
    return ", ".join(parts)


def _run(args: argparse.Namespace, action: Any) -> int:
    """Map the pipeline's exceptions to exit codes and one-line messages."""
    from models.presets import ExportVerificationError, ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        for variant in _variants(args.variant):
            action(variant)
    except (ModelLoadError, FileNotFoundError) as exc:
        print(f"grym-stream models: {exc}", file=sys.stderr)
        return EXIT_LOAD
    except ExportVerificationError as exc:
        print(f"grym-stream models: verification failed: {exc}", file=sys.stderr)
        print(json.dumps(exc.report, indent=2), file=sys.stderr)
        return EXIT_VERIFY
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from models.export import ensure_artifact

    def one(variant: str) -> None:
        artifact = ensure_artifact(
            args.model,
            variant,
            model_dir=args.model_dir,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
        state = "cached" if artifact.reused else "exported"
        print(
            f"{variant:9} {state:8} {artifact.folder}  ({_summary(artifact.meta['verification'])})",
            flush=True,
        )

    return _run(args, one)


def _verify(args: argparse.Namespace) -> int:
    from models.export import verify_artifact

    def one(variant: str) -> None:
        report = verify_artifact(
            args.model,
            variant,
            model_dir=args.model_dir,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
        )
        print(f"{variant:9} ok       {_summary(report)}", flush=True)
        for case in report["cases"]:
            fields = ", ".join(f"{k} {v:.6g}" for k, v in case.items() if k != "shape")
            print(f"          batch {case['shape'][0]} x {case['shape'][1]} samples: {fields}")

    return _run(args, one)


def _fused(meta: dict[str, Any]) -> str:
    stats = meta.get("fused_operators") or {}
    short = {
        "Attention": "Attn",
        "SkipLayerNormalization": "SkipLN",
        "BiasGelu": "BiasGelu",
        "LayerNormalization": "LN",
    }
    return " ".join(f"{short.get(k, k)}:{v}" for k, v in stats.items() if v) or "-"


def _list(args: argparse.Namespace) -> int:
    from models.export import default_cache_dir, list_artifacts

    artifacts = list_artifacts(args.cache_dir)
    if args.json:
        for meta in artifacts:
            print(json.dumps(meta))
        return EXIT_OK
    if not artifacts:
        print(f"no artifacts under {args.cache_dir or default_cache_dir()}")
        return EXIT_OK
    rows = [("model", "variant", "head", "trained", "size MB", "fused ops", "created")]
    for meta in artifacts:
        model = meta.get("preset") or meta.get("source") or meta["checkpoint_key"]
        rows.append(
            (
                model,
                meta["variant"],
                meta["head"],
                "yes" if meta["trained"] else "no",
                f"{sum(meta['file_sizes'].values()) / 1e6:.1f}",
                _fused(meta),
                meta["created"][:19],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK
