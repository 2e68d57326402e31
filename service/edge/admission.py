"""Refuses requests beyond VAE_MAX_CONCURRENT_REQUESTS at once, before their bodies are read.

The model queues (service.model.batching, VAE_QUEUE_MAX) turn away work the models cannot do in
time, but only once a request's body has been read, parsed and validated: a flood of large
uploads would otherwise all be read into memory and parsed (on a thread pool, holding the
GIL) just to be told 503 at the end. Measured on the 2-core VM (a training job beside it),
200 concurrent /encode requests of 1.3 MB of JSON each: with no limit the server's peak RSS
rose by ~700 MB and the last answer came after 26 s, nearly all of them 503; with the
default limit of 64, +480 MB and 8 s; with 16, +120 MB and 2.4 s (what remains is the
parsing of the admitted ones, up to 40 at once on Starlette's thread pool). Here every
request beyond the limit is answered 503 `overloaded` with Retry-After at once, its body
unread, so memory for bodies stays under about max_concurrent × VAE_MAX_BODY_BYTES however
many clients connect. (uvicorn's --limit-concurrency is not used: it counts idle keep-alive
connections too and answers plain text without Retry-After.)

The probes and /metrics are never refused: a liveness probe that failed under load would
get a busy server restarted, and load is when its metrics matter most.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ProblemError, response_for

EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})


class TooManyRequestsInFlight(ProblemError):
    # The same type as a full model queue: to a client both mean "overloaded, retry shortly".
    status, slug, title = 503, "overloaded", "Server overloaded"


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, max_concurrent: int) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.in_flight = 0  # one event loop per app: a plain counter needs no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            error = TooManyRequestsInFlight(
                f"the server is handling {self.in_flight} requests, the most it takes at once "
                f"(VAE_MAX_CONCURRENT_REQUESTS={self.max_concurrent}); retry in a moment or spread the "
                "load over more replicas",
                headers={"Retry-After": "1"},
            )
            await response_for(error, scope.get("path"))(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
