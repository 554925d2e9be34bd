"""What operators read: /healthz (what runs), /readyz (may it take traffic), /v1/status (the
status page's data) and /metrics (Prometheus).

/healthz and /readyz are open, for load balancers: they show counts and models, never a session
id. /v1/status (live session ids and their state) and /metrics are guarded like the rest of the
API (`stream.transports.access.guarded`): the Origin allow-list, and the token when the server
has one (Prometheus sends it with `authorization: {credentials: ...}` in its scrape config)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stream import __version__
from stream.metrics import Metrics
from stream.session import SessionManager
from stream.transports.access import guarded


async def healthz(request: Request) -> JSONResponse:
    sessions: SessionManager = request.app.state.sessions
    return JSONResponse(
        {
            "status": "ok",
            "version": __version__,
            "frontend": sessions.settings.frontend_id,
            "store": sessions.store.where if sessions.store is not None else None,
            "sessions": sessions.state()["sessions"],
            "max_sessions": sessions.settings.max_sessions,
            "analysers": [engine.name for engine in sessions.engines],
            "trained": all(engine.trained for engine in sessions.engines),
            "models": {engine.name: engine.describe() for engine in sessions.engines},
            "analysis": {engine.name: engine.stats() for engine in sessions.engines},
            "generator": sessions.generator.describe() if sessions.generator else None,
            "generation": sessions.generator.stats() if sessions.generator else None,
        }
    )


async def readyz(request: Request) -> JSONResponse:
    """200 when the models are loaded and warmed up and the generator (if any) is up; 503 while
    starting, draining or shutting down, or restarting a crashed generation worker (for as long
    as that takes: the engine keeps trying), with "generation" saying how the restart goes."""
    sessions: SessionManager = request.app.state.sessions
    generator = sessions.generator
    checks = {
        "started": bool(request.app.state.ready),
        "serving": not getattr(request.app.state, "draining", False),
        # A shared store that cannot be reached: live sessions go on, new ones are refused.
        "store": (sessions.store is None or not sessions.store.failing)
        and (sessions.leases is None or sessions.leases.reachable),
        "generator": generator is None or (generator.available and generator.running),
        # Models on a Ray cluster (--inference ray) that cannot be reached: sessions get errors.
        "inference": all(engine.analyser.available for engine in sessions.engines),
    }
    ready = all(checks.values())
    body: dict[str, object] = {"ready": ready, "frontend": sessions.settings.frontend_id, **checks}
    if generator is not None:
        stats = generator.stats()
        body["generation"] = {
            key: stats[key] for key in ("available", "restarting", "restarts", "restart_failures")
        }
    return JSONResponse(body, status_code=200 if ready else 503)


async def status(request: Request) -> JSONResponse:
    """What the status page shows: live sessions, load, recent errors."""
    sessions: SessionManager = request.app.state.sessions
    metrics: Metrics = request.app.state.metrics
    state = sessions.state()
    return JSONResponse(
        {
            "uptime_s": round(time.time() - metrics.started, 1),
            "sessions": [s.summary() for s in sessions.sessions.values()],
            "load": {
                "sessions": state["sessions"],
                "sessions_limit": state["sessions_limit"],
                "backlog_chunks": state["backlog"],
                "analysis_queue": state["analysis_queue"],
                "generation": state["generation"],
                "loop_lag_p95_s": metrics.lag_quantile(0.95),
            },
            "recent_errors": list(metrics.recent_errors)[::-1],
        }
    )


async def metrics_endpoint(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", guarded(metrics_endpoint)),
    Route("/v1/status", guarded(status)),
]
