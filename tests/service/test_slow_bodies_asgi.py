"""The body deadline and the per-client limit (issue 25), at the ASGI level: the middlewares of
service.edge driven with hand-made receive() calls whose bytes arrive on a schedule, so each
timing rule is checked in a fraction of a second. tests/service/test_slow_clients.py attacks
a real server process with real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from service.edge.admission import AdmissionMiddleware
from service.edge.body_deadline import DRAIN_BYTES, BodyDeadlineMiddleware
from service.edge.clients import ThrottledWarnings, client_key
from service.metrics import Metrics
from service.settings import Settings
from tests.process_support import metric

Message = dict[str, Any]


def scope_for(
    body_bytes: int | None, client: str = "127.0.0.2", path: str = "/sample", **headers: str
) -> dict[str, Any]:
    raw = [(b"content-type", b"application/json")]
    if body_bytes is not None:
        raw.append((b"content-length", str(body_bytes).encode()))
    raw += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": path, "headers": raw, "client": (client, 40000)}


def scheduled(parts: list[tuple[float, bytes]], complete: bool = True) -> Callable[[], Awaitable[Message]]:
    """A receive() that hands out each part of the body after its delay; with complete=False
    the body never ends: once the parts run out it waits forever (a client that stopped)."""
    queue = list(parts)

    async def receive() -> Message:
        if not queue:
            await asyncio.Event().wait()
        delay, chunk = queue.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue) or not complete}

    return receive


async def reads_its_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An app that reads the whole body, then answers 200 with its length (as FastAPI would)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def guard(
    app: Any, metrics: Metrics, timeout_s: float = 0.3, min_rate: int = 1000, max_s: float = 2.0
) -> Any:
    return BodyDeadlineMiddleware(app, metrics=metrics, timeout_s=timeout_s, min_rate=min_rate, max_s=max_s)


async def call(app: Any, scope: dict[str, Any], receive: Any) -> tuple[list[Message], float]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    start = time.perf_counter()
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent, time.perf_counter() - start


def status_headers_body(sent: list[Message]) -> tuple[int, dict[bytes, bytes], bytes]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), body


def test_a_body_that_trickles_gets_408_naming_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    app = guard(reads_its_body, metrics)
    # 10 bytes every 0.1 s (100 B/s, a tenth of the minimum rate): never idle, always behind.
    receive = scheduled([(0.1, b"x" * 10) for _ in range(50)])
    with caplog.at_level(logging.WARNING, "service.edge.body_deadline"):
        sent, took = asyncio.run(call(app, scope_for(500), receive))
    status, headers, body = status_headers_body(sent)
    # 0.3 s plus 1 s per 1000 bytes: the deadline meets the bytes at 1/3 s.
    assert status == 408 and 0.3 < took < 0.8, (status, took)
    assert headers[b"connection"] == b"close"  # the socket goes, not only the slot
    problem = orjson.loads(body)
    assert problem["type"] == "urn:vae:problem:body-timeout" and problem["limit"] == "rate"
    assert 20 <= problem["received_bytes"] <= 50, problem
    for named in (" of 500 bytes", "VAE_BODY_TIMEOUT_S=0.3", "VAE_BODY_MIN_RATE=1000"):
        assert named in problem["detail"], problem["detail"]
    assert [m for m in sent if m["type"] == "http.response.start"] == sent[:1]  # the app's answer dropped
    assert metric(metrics_text(metrics), "vae_http_body_timeouts_total", limit="rate") == 1
    assert "127.0.0.2" in caplog.text and "VAE_BODY_MIN_RATE" in caplog.text, caplog.text


def test_a_body_that_stops_mid_way_gets_408_after_a_pause_however_much_came_before() -> None:
    metrics = Metrics()
    # 900 bytes at once would buy 0.9 s more under the rate alone; a pause of 0.3 s ends it.
    receive = scheduled([(0.0, b"x" * 900)], complete=False)
    sent, took = asyncio.run(call(guard(reads_its_body, metrics), scope_for(1000), receive))
    status, headers, body = status_headers_body(sent)
    assert status == 408 and 0.25 < took < 0.7 and headers[b"connection"] == b"close", (status, took)
    problem = orjson.loads(body)
    assert problem["limit"] == "idle" and problem["received_bytes"] == 900
    assert "no byte for VAE_BODY_TIMEOUT_S=0.3 s" in problem["detail"], problem["detail"]
    assert metric(metrics_text(metrics), "vae_http_body_timeouts_total", limit="idle") == 1


def test_arriving_bytes_extend_the_deadline_so_a_body_at_the_minimum_rate_succeeds() -> None:
    metrics = Metrics()
    # 1.2 s for 1200 bytes at 1000 B/s: four times the 0.3 s a body gets before its bytes count.
    parts = [(0.1, b"x" * 100) for _ in range(12)]
    sent, took = asyncio.run(call(guard(reads_its_body, metrics), scope_for(1200), scheduled(parts)))
    status, _, body = status_headers_body(sent)
    assert status == 200 and body == b"1200" and took > 1.1, (status, body, took)
    assert metric(metrics_text(metrics), "vae_http_body_timeouts_total") == 0


def test_no_body_takes_longer_than_the_total_limit_however_fast_its_bytes_come() -> None:
    metrics = Metrics()
    parts = [(0.1, b"x" * 5000) for _ in range(40)]  # 50 kB/s, far above the rate, but 4 s in all
    sent, took = asyncio.run(
        call(guard(reads_its_body, metrics, max_s=1.0), scope_for(200_000), scheduled(parts))
    )
    status, _, body = status_headers_body(sent)
    assert status == 408 and 0.9 < took < 1.6, (status, took)
    assert (
        orjson.loads(body)["limit"] == "total" and "VAE_BODY_TIMEOUT_MAX_S=1" in orjson.loads(body)["detail"]
    )
    assert metric(metrics_text(metrics), "vae_http_body_timeouts_total", limit="total") == 1


def test_requests_without_a_body_and_bodies_already_here_pay_no_wait() -> None:
    metrics = Metrics()
    sent, took = asyncio.run(call(guard(reads_its_body, metrics), scope_for(None), scheduled([(0.0, b"")])))
    assert status_headers_body(sent)[0] == 200 and took < 0.2
    sent, took = asyncio.run(call(guard(reads_its_body, metrics), scope_for(3), scheduled([(0.0, b"abc")])))
    assert status_headers_body(sent)[:3:2] == (200, b"3") and took < 0.2


async def refuses_at_once(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An app that answers without reading the body, as a refusal at the door does."""
    await send({"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": b"full"})


def test_an_answer_before_the_body_waits_for_it_and_drops_it() -> None:
    """A client that sends its whole body before reading gets the refusal, not a reset: the
    rest of its body is read first (within the deadline) and the connection stays usable."""
    parts = [(0.05, b"x" * 100) for _ in range(5)]
    sent, took = asyncio.run(call(guard(refuses_at_once, Metrics()), scope_for(500), scheduled(parts)))
    status, headers, body = status_headers_body(sent)
    assert status == 503 and body == b"full" and b"connection" not in headers and took > 0.2


def test_an_answer_before_a_body_that_never_comes_closes_the_connection() -> None:
    metrics = Metrics()
    sent, took = asyncio.run(
        call(guard(refuses_at_once, metrics), scope_for(500), scheduled([(0.0, b"x")], False))
    )
    status, headers, _ = status_headers_body(sent)
    # The refusal goes out at the deadline, closing the socket uvicorn would keep reading forever.
    assert status == 503 and headers[b"connection"] == b"close" and 0.25 < took < 1.0, (status, took)
    assert metric(metrics_text(metrics), "vae_http_body_timeouts_total") == 0  # not a 408


def test_a_refusal_reads_at_most_64_kib_more_and_nothing_from_a_client_awaiting_100_continue() -> None:
    """Then the answer goes, with Connection: close: reading a large body only to drop it would
    cost an overloaded server the time it refuses requests to save."""
    chunks = 0

    async def endless() -> Message:  # a fast client with a large body
        nonlocal chunks
        chunks += 1
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"x" * 16384, "more_body": True}

    # 64 KiB is four of its parts: the fifth takes the drain past it.
    for scope, expected in (
        (scope_for(500, expect="100-continue"), 0),
        (scope_for(10 << 20), DRAIN_BYTES // 16384 + 1),
    ):
        chunks = 0
        sent, took = asyncio.run(call(guard(refuses_at_once, Metrics()), scope, endless))
        status, headers, _ = status_headers_body(sent)
        assert status == 503 and headers[b"connection"] == b"close" and took < 0.2, (scope, took)
        assert chunks == expected, (scope, chunks)


def test_a_deadline_of_zero_turns_the_deadline_off() -> None:
    app = guard(reads_its_body, Metrics(), timeout_s=0.0)
    parts = [(0.5, b"x" * 10), (0.5, b"y")]
    sent, took = asyncio.run(call(app, scope_for(11), scheduled(parts)))
    assert status_headers_body(sent)[0] == 200 and took > 0.9


async def stalls(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await asyncio.sleep(0.3)
    await reads_its_body(scope, receive, send)


def test_one_client_gets_429_past_its_share_while_others_are_admitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    admission = AdmissionMiddleware(stalls, max_concurrent=4, per_client=2, metrics=metrics)

    async def run() -> list[tuple[str, int, dict[bytes, bytes], bytes]]:
        async def one(client: str, delay: float) -> tuple[str, int, dict[bytes, bytes], bytes]:
            await asyncio.sleep(delay)
            sent, _ = await call(admission, scope_for(1, client=client), scheduled([(0.0, b"1")]))
            return (client, *status_headers_body(sent))

        clients = [("127.0.0.2", 0.0), ("127.0.0.2", 0.0), ("127.0.0.2", 0.05), ("127.0.0.1", 0.05)]
        return list(await asyncio.gather(*(one(c, d) for c, d in clients)))

    with caplog.at_level(logging.WARNING, "service.edge.admission"):
        answers = asyncio.run(run())
    assert [status for _, status, _, _ in answers] == [200, 200, 429, 200]
    _, _, headers, body = answers[2]
    problem = orjson.loads(body)
    assert headers[b"retry-after"] == b"1" and problem["type"] == "urn:vae:problem:too-many-from-client"
    assert "127.0.0.2" in problem["detail"] and "VAE_FORWARDED_ALLOW_IPS" in problem["detail"]
    assert admission.in_flight == 0 and admission.by_client == {}  # nothing leaks per address
    assert metric(metrics_text(metrics), "vae_http_client_refusals_total") == 1
    assert "client 127.0.0.2 has 2 requests in flight" in caplog.text


def test_the_share_is_of_the_global_limit_at_least_one_and_one_means_off() -> None:
    def limit(**values: Any) -> int:
        return Settings(**values).per_client_limit()

    assert limit() == 32  # half of 64
    assert limit(max_client_share=0.01) == 1
    assert limit(max_client_share=1.0) == 0 and limit(max_concurrent_requests=0) == 0


def test_body_deadline_settings_must_be_in_order() -> None:
    with pytest.raises(ValueError, match="body_timeout_max_s"):
        Settings(body_timeout_s=60, body_timeout_max_s=30)


def test_an_ipv6_client_counts_as_its_64_and_a_mapped_ipv4_as_itself() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7" and client_key("192.0.2.7") == "192.0.2.7"


def test_warnings_about_one_client_are_throttled_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    warnings = ThrottledWarnings(logging.getLogger("test.throttle"), interval=0.2)
    with caplog.at_level(logging.WARNING, "test.throttle"):
        for _ in range(5):
            warnings.warning("a", "about %s", "a")
        warnings.warning("b", "about %s", "b")
        time.sleep(0.25)
        warnings.warning("a", "about %s", "a")
    assert [r.getMessage() for r in caplog.records] == [
        "about a",
        "about b",
        "about a (and 4 more like it in the last 0.2 s, not logged)",
    ]


def metrics_text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_slot_is_free_once_the_answer_is_sent_before_the_app_has_returned() -> None:
    """A client may send its next request the moment it has an answer: with one slot per
    client, that request is admitted although the first one's app is still cleaning up (W1's
    32 connections otherwise met a 429 now and then)."""
    answered, cleaned_up = asyncio.Event(), asyncio.Event()

    async def slow_clean_up(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await reads_its_body(scope, receive, send)
        if scope["path"] == "/first":
            answered.set()
            await cleaned_up.wait()

    admission = AdmissionMiddleware(slow_clean_up, max_concurrent=4, per_client=1, metrics=Metrics())

    async def run() -> int:
        first = asyncio.create_task(call(admission, scope_for(1, path="/first"), scheduled([(0.0, b"1")])))
        await answered.wait()
        sent, _ = await call(admission, scope_for(1, path="/second"), scheduled([(0.0, b"1")]))
        cleaned_up.set()
        await first
        return status_headers_body(sent)[0]

    assert asyncio.run(run()) == 200
    assert admission.in_flight == 0 and admission.by_client == {}
