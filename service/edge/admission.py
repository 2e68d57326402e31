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
never parsed or kept, so memory for bodies stays under about max_concurrent ×
VAE_MAX_BODY_BYTES however many clients connect. (uvicorn's --limit-concurrency is not used:
it counts idle keep-alive connections too and answers plain text without Retry-After.)

The probes and /metrics are never refused: a liveness probe that failed under load would
get a busy server restarted, and load is when its metrics matter most.

One client address may hold at most VAE_MAX_CLIENT_SHARE of those slots (half, by default):
its next request is answered 429 with Retry-After while other clients are still admitted.
Without it, one client with 64 sockets that each sent a body a byte at a time took every
slot (the body deadline, service.edge.body_deadline, bounds how long each such request is
held; this bounds how many one client holds). The address is the peer's, or the forwarded
one behind the proxies of VAE_FORWARDED_ALLOW_IPS (service.edge.clients); over a Unix
socket there is none, and only the global limit applies.

A refusal is answered at once; service.edge.body_deadline then reads and drops up to 64 KiB
more of the body the client is still sending (within the body deadline) before the answer
goes out, so that a client that sends its whole body before reading gets the answer, not a
reset, and a refused slow client waits in no slot instead of coming straight back.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.clients import ThrottledWarnings, client_address, client_key
from service.errors import ProblemError, TooManyFromClient, response_for
from service.metrics import Metrics

EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})
log = logging.getLogger("service.edge.admission")


class TooManyRequestsInFlight(ProblemError):
    # The same type as a full model queue: to a client both mean "overloaded, retry shortly".
    status, slug, title = 503, "overloaded", "Server overloaded"


class AdmissionMiddleware:
    def __init__(
        self, app: ASGIApp, max_concurrent: int, per_client: int = 0, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.per_client = per_client  # 0: no per-client limit
        self.metrics = metrics
        self.in_flight = 0  # one event loop per app: plain counters need no lock
        self.by_client: dict[str, int] = {}  # only clients with requests in flight: bounded by the slots
        self.warnings = ThrottledWarnings(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT:
            await self.app(scope, receive, send)
            return
        address = client_address(scope) if self.per_client else None
        key = client_key(address) if address is not None else None
        if key is not None and self.by_client.get(key, 0) >= self.per_client:
            await response_for(self._client_refusal(address, key), scope.get("path"))(scope, receive, send)
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
        if key is not None:
            self.by_client[key] = self.by_client.get(key, 0) + 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.in_flight -= 1
                if key is not None:
                    left = self.by_client[key] - 1
                    if left:
                        self.by_client[key] = left
                    else:
                        del self.by_client[key]

        async def send_releasing(message: Message) -> None:
            # The slot is free once the answer's last part is handed on, before the app's own
            # clean-up: a client with 32 connections may send its next request the moment it has
            # that answer, and must not find its previous one still counted (measured: 75 of
            # 16,000 W1 requests from 32 connections were refused with 429 before this).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()

    def _client_refusal(self, address: str | None, key: str) -> TooManyFromClient:
        if self.metrics is not None:
            self.metrics.client_refusals.inc()
        self.warnings.warning(
            key,
            "client %s has %d requests in flight, its share of the server (VAE_MAX_CLIENT_SHARE of "
            "VAE_MAX_CONCURRENT_REQUESTS=%d): answering 429 to its next ones while others are admitted",
            key,
            self.per_client,
            self.max_concurrent,
        )
        who = address if key == address else f"{address} (counted as {key})"
        return TooManyFromClient(
            f"this client, {who}, already has {self.per_client} requests in flight, the most one "
            f"client may have at once (VAE_MAX_CLIENT_SHARE of VAE_MAX_CONCURRENT_REQUESTS="
            f"{self.max_concurrent}); wait for an answer before sending more. If many clients reach "
            "this server through one proxy, the operator should name it in VAE_FORWARDED_ALLOW_IPS",
            headers={"Retry-After": "1"},
        )
