"""A request body has a deadline, which the bytes that arrive extend (Apache mod_reqtimeout's
`body=10,MinRate=4096`): VAE_BODY_TIMEOUT_S from the request's headers, plus one second for
every VAE_BODY_MIN_RATE bytes received, and VAE_BODY_TIMEOUT_MAX_S at most in all; and no
more than VAE_BODY_TIMEOUT_S may pass without a byte, however many came before (nginx's
client_body_timeout). A body that misses either, because it trickles or because it stopped
mid-way, is answered 408 with
`Connection: close`: the request's admission slot (service.edge.admission) and its socket
are freed at once.

Why: admission counts a request from its headers, before its body is read (that bounds the
memory uploads take), and uvicorn has no body timeout. So 64 connections that each sent a
byte every 7 s held all 64 slots for as long as they liked, and every other client got 503
(the slow-POST attack, "R.U.D.Y."). A real client on a slow link is not hurt: one that keeps
up VAE_BODY_MIN_RATE (4 KiB/s, 32 kbit/s) on average never reaches the deadline, and the
largest body (8 MiB) needs 28 KB/s to fit in VAE_BODY_TIMEOUT_MAX_S (Chrome's "Slow 3G"
profile sends 50 KB/s).

An answer that goes out before its request's body has all arrived (a 503 or 429 at the door,
a 401, a 404) first reads the rest of the body and drops it, up to 64 KiB more, under the
same deadline: a client that sends its whole body before reading (most do) then gets the
answer rather than a connection reset, and a refused slow client is held (in no slot) until
its deadline instead of coming straight back. A larger body, or one that misses the
deadline there, gets the answer with `Connection: close`: uvicorn would otherwise keep
reading it, with no deadline, for as long as the client kept sending.

Cheaply: one timer per request with a body, armed once at the first deadline and moved only
when it fires early. When it fires late while the request's task waits in receive(), it
cancels that wait and the cancellation becomes BodyTimedOut (Task.uncancel keeps asyncio's
bookkeeping straight); as in body_limit, the app's own answer to the cut-off body is dropped
and the 408 goes out instead."""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.clients import ThrottledWarnings, client_address
from service.errors import BodyTimedOut, response_for
from service.metrics import Metrics

log = logging.getLogger("service.edge.body_deadline")


# The most of a body that an answer sent before it (a refusal) reads and drops; past it the
# answer goes with Connection: close. Waiting costs nothing, reading costs the event loop:
# reading all of 72 refused 1.4 MB uploads under overload took it long enough to triple those
# refusals' p99 (0.36 -> 2.2 s, tests/service/test_overload.py). Closing at once instead cost
# more still: refused slow clients came straight back, 54,565 connections in 16 s from one
# address, and the ordinary clients beside them got 4.5 times fewer answers. Every /sample,
# /decode and one-digit /encode fits in 64 KiB; a trickle never reaches it before its deadline.
DRAIN_BYTES = 64 * 1024


class _Expired(Exception):
    """The body's deadline passed (internal: the app is told with BodyTimedOut)."""


class BodyDeadlineMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        timeout_s: float,
        min_rate: int,
        max_s: float,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.min_rate = min_rate
        self.max_s = max_s
        self.warnings = ThrottledWarnings(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.timeout_s:
            await self.app(scope, receive, send)
            return
        declared, chunked, expects_continue = body_headers(scope)
        if not declared and not chunked:  # no body to wait for (GET, HEAD, an empty POST)
            await self.app(scope, receive, send)
            return
        body = _Body(self, scope, receive, send, declared, expects_continue)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.told_app:
                raise
            # Told that its body timed out, the app may have failed in any way: moot, the 408 follows.
        finally:
            body.stop()
        if body.told_app and not body.response_started:
            await response_for(body.error(), scope.get("path"))(scope, receive, send)


class _Body:
    """One request's body as it arrives: its clock, and the receive and send the app is given."""

    def __init__(
        self,
        guard: BodyDeadlineMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        declared: int | None,
        expects_continue: bool,
    ) -> None:
        self.guard = guard
        self.scope = scope
        self._receive = receive
        self._send = send
        self.declared = declared
        self.expects_continue = expects_continue
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.received = 0
        self.last_bytes = self.start  # when bytes last arrived
        self.read_any = False
        self.done = False  # the last part of the body (or the client's disconnect) has come
        self.expired: str | None = None  # the limit it missed: "rate", "total" or "idle"
        self.told_app = False  # the app got BodyTimedOut: its answer is dropped, the 408 replaces it
        self.response_started = False
        self._waiting: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(self.start + guard.timeout_s, self._check)

    def deadlines(self) -> dict[str, float]:
        g = self.guard
        return {
            "rate": self.start + g.timeout_s + self.received / g.min_rate,
            "total": self.start + g.max_s,
            "idle": self.last_bytes + g.timeout_s,
        }

    def _check(self) -> None:
        limit, deadline = min(self.deadlines().items(), key=lambda item: item[1])
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._check)
            return
        self._timer = None
        self.expired = limit
        if self._waiting is not None:
            self._waiting.cancel()
        self._record()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _next(self) -> Message:
        """The next message of the body; _Expired once the deadline has passed."""
        if self.expired:
            raise _Expired
        if self.done:  # after the body only a disconnect can come: no deadline for waiting on it
            return await self._receive()
        task = self._waiting = asyncio.current_task()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # Ours (the deadline) unless someone else cancelled the task too (a shutdown).
            if self.expired and task is not None and task.uncancel() == 0:
                raise _Expired from None
            raise
        finally:
            self._waiting = None
        self.read_any = True
        if message["type"] == "http.request":
            if chunk := len(message.get("body", b"")):
                self.received += chunk
                self.last_bytes = self.loop.time()
            if not message.get("more_body", False):
                self._finish()
        else:  # http.disconnect: nothing more will come
            self._finish()
        return message

    def _finish(self) -> None:
        self.done = True
        self.stop()

    async def receive(self) -> Message:
        try:
            return await self._next()
        except _Expired:
            self.told_app = True
            raise self.error() from None

    async def send(self, message: Message) -> None:
        if self.told_app:
            return  # the app's answer to a body it never got whole: the 408 replaces it
        if message["type"] == "http.response.start":
            self.response_started = True
            if not self.done:
                await self._drain()
                if not self.done:
                    message = _closing(message)
        await self._send(message)

    async def _drain(self) -> None:
        """Reads and drops the rest of the body, within its deadline and DRAIN_BYTES."""
        if self.expects_continue and not self.read_any:
            return  # the client waits for 100 Continue before it sends a byte: nothing to read
        budget = self.received + DRAIN_BYTES
        while not self.done and self.received <= budget:
            try:
                await self._next()
            except _Expired:
                return

    def error(self) -> BodyTimedOut:
        g = self.guard
        of = f"{self.declared}" if self.declared is not None else "an unknown number of"
        if self.expired == "total":
            why = f"more than VAE_BODY_TIMEOUT_MAX_S={g.max_s:g} s, the longest any body may take"
        elif self.expired == "idle":
            why = f"with no byte for VAE_BODY_TIMEOUT_S={g.timeout_s:g} s, the longest a body may pause"
        else:
            why = (
                f"more than a body may take: VAE_BODY_TIMEOUT_S={g.timeout_s:g} s, plus 1 s for every "
                f"VAE_BODY_MIN_RATE={g.min_rate} bytes received"
            )
        return BodyTimedOut(
            f"the request body did not arrive in time: {self.received} of {of} bytes in "
            f"{self.loop.time() - self.start:.1f} s, {why}. Send the body at least that fast; "
            "an operator can raise those settings for clients on slower links",
            headers={"Connection": "close"},
            limit=self.expired,
            received_bytes=self.received,
        )

    def _record(self) -> None:
        g = self.guard
        if self.response_started:  # an earlier answer (a refusal) waited on this body: it goes now
            outcome = "closing the connection after its answer"
        else:
            outcome = "answering 408 and freeing its slot"
            g.metrics.body_timeouts.labels(self.expired).inc()
        address = client_address(self.scope) or "(no address)"
        limit = {
            "total": f"VAE_BODY_TIMEOUT_MAX_S={g.max_s:g} s",
            "idle": f"VAE_BODY_TIMEOUT_S={g.timeout_s:g} s without a byte",
            "rate": f"VAE_BODY_TIMEOUT_S={g.timeout_s:g} s + bytes / VAE_BODY_MIN_RATE={g.min_rate} B/s",
        }[self.expired or "rate"]
        g.warnings.warning(
            (address, self.expired, self.response_started),
            "slow request body from %s on %s %s: %d of %s bytes after %.1f s, past %s; %s",
            address,
            self.scope.get("method", ""),
            self.scope.get("path", ""),
            self.received,
            self.declared if self.declared is not None else "?",
            self.loop.time() - self.start,
            limit,
            outcome,
        )


def _closing(message: Message) -> Message:
    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
    return {**message, "headers": [*headers, (b"connection", b"close")]}


def body_headers(scope: Scope) -> tuple[int | None, bool, bool]:
    """(Content-Length or None, chunked, Expect: 100-continue) as the client sent them."""
    declared: int | None = None
    chunked = expects_continue = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"expect":
            expects_continue = value.lower() == b"100-continue"
    return declared, chunked, expects_continue
