"""Retry policies for model calls: how many attempts, how long each may take, how long to wait
between them. One policy per pipeline step (settings, or a step's `retry` in a pipeline)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(2, ge=1, le=10)  # 1 = no retry
    backoff_seconds: float = Field(0.1, ge=0, le=60)  # before the second attempt; then doubles
    timeout_seconds: float | None = Field(30.0, gt=0)  # per attempt; None = no limit

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return self.backoff_seconds * 2 ** (attempt - 1)


async def call_with_retry(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    on_failure: Callable[[int, Exception], None] | None = None,
) -> T:
    """`await attempt()` until it succeeds within the policy's timeout, at most
    `policy.attempts` times; `on_failure(number, error)` hears of each failed one (a timeout
    is a TimeoutError). The last failure is raised."""
    for number in range(1, policy.attempts + 1):
        try:
            async with asyncio.timeout(policy.timeout_seconds):
                return await attempt()
        except Exception as exc:
            if on_failure is not None:
                on_failure(number, exc)
            if number == policy.attempts:
                raise
        await asyncio.sleep(policy.delay(number))
    raise AssertionError("unreachable")  # attempts >= 1
