"""The figures README.md and BENCHMARKS.md quote are those of the committed full bench run
(benchmarks/results/bench/bench.json), so a new run that is committed without them fails here."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "results" / "bench"


def test_readme_and_benchmarks_md_quote_the_committed_run() -> None:
    result = json.loads((RUN / "bench.json").read_text())
    assert result["settings"]["quick"] is False  # a full run, not the smoke test
    # (as JSON text: NaN, where a figure could not be measured, equals itself there)
    assert json.dumps(report.headline(result)) == json.dumps(result["headline"])
    readme = (ROOT / "README.md").read_text()
    for line in report.readme_table(result).splitlines():
        assert line in readme, f"README.md does not quote: {line}"
    tables = (RUN / "bench.md").read_text()
    assert tables == report.markdown(result)
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    for line in tables.splitlines():
        if line.startswith("|"):
            assert line in benchmarks, f"BENCHMARKS.md does not quote: {line}"
    for plot in ("latency-cdf.png", "p95-vs-sessions.png", "stages.png"):
        assert (RUN / plot).is_file() and f"results/bench/{plot}" in benchmarks


def test_benchmarks_md_quotes_the_committed_scale_out_run() -> None:
    folder = ROOT / "benchmarks" / "results" / "scaleout"
    result = json.loads((folder / "scaleout.json").read_text())
    assert result["settings"]["quick"] is False
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    for line in (folder / "scaleout.md").read_text().splitlines():
        if line.startswith("|"):
            assert line in benchmarks, f"BENCHMARKS.md does not quote: {line}"
