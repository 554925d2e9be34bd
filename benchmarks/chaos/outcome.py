"""What a scenario reports: checks against targets, figures, and the plan it ran under."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Check:
    """One target: `what` was measured as `measured`; `target` says what holds it."""

    what: str
    measured: Any
    target: str
    ok: bool
    timed: bool = False  # a speed or memory figure: the test suite reports it, never asserts it


@dataclass
class Outcome:
    scenario: str
    summary: str = ""  # one line: what was done
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None  # why the scenario did not run (e.g. it needs its own server)

    @property
    def ok(self) -> bool:
        return self.skipped is None and bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, what: str, measured: Any, target: str, ok: bool, timed: bool = False) -> bool:
        self.checks.append(Check(what, measured, target, bool(ok), timed))
        return bool(ok)

    def at_most(
        self, what: str, measured: float, limit: float, unit: str = "", timed: bool = False
    ) -> bool:
        return self.check(what, measured, f"<= {limit:g}{unit}", measured <= limit, timed)

    def exactly(self, what: str, measured: Any, expected: Any) -> bool:
        return self.check(what, measured, f"= {expected}", measured == expected)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Plan:
    """How big a run is: `quick` scales every scenario down to seconds."""

    quick: bool = False
    url: str | None = None  # an existing server: only scenarios that need no process run
    seed: int = 0
    log: Any = print

    def size(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def progress(self, message: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
