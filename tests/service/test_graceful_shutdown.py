"""`docker stop` drains: SIGTERM to a real `vae-serve` under load, and every request it had
accepted before the signal still gets its full answer before the process exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from process_support import clean_env, clean_exit, metric, serve

REQUESTS = 16
SAMPLES = 1024  # a large PNG answer: each request takes a noticeable time on one inference thread


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request(tiny_store: Path, tmp_path: Path) -> None:
    # The queue limit (service.model.batching) would refuse part of this burst with 503 by design;
    # this test is about shutdown, so the limit is lifted (an unknown VAE_ variable is ignored).
    env = clean_env(VAE_QUEUE_MAX=str(10 * REQUESTS * SAMPLES))
    served = serve(
        tiny_store, tmp_path / "serve.log", "--inference-threads", "1", "--models", "tiny", env=env
    )
    answers: dict[int, tuple[int, int, float]] = {}

    def client(seed: int) -> None:
        with httpx.Client(base_url=served.url, timeout=120) as http:
            try:
                answer = http.post("/sample", json={"n": SAMPLES, "seed": seed})
                images = len(answer.json()["images"]) if answer.status_code == 200 else 0
                answers[seed] = (answer.status_code, images, time.monotonic())
            except httpx.HTTPError as exc:
                answers[seed] = (0, 0, time.monotonic())
                raise AssertionError(f"request {seed} failed: {exc!r}") from exc

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(REQUESTS)]
    try:
        with httpx.Client(base_url=served.url, timeout=30) as probe:
            # The startup warm-up's own /sample requests are counted too (service.warmup): only
            # what comes after them is ours. Counting them once let SIGTERM go out while one of
            # our requests still sat unread in the socket, and the server rightly reset it.
            before = metric(probe.get("/metrics").text, "vae_http_requests_total", route="/sample")
            for thread in threads:
                thread.start()
            # "Accepted" = the server is handling it: in flight now, or already answered. Wait for
            # all of them, then signal at once, while most are still queued for the model.
            deadline = time.monotonic() + 60
            while True:
                text = probe.get("/metrics").text
                in_flight = metric(text, "vae_http_requests_in_flight") - 1  # less this /metrics
                answered = metric(text, "vae_http_requests_total", route="/sample") - before
                if in_flight + answered >= REQUESTS:
                    break
                assert time.monotonic() < deadline, f"only {in_flight + answered} requests accepted"
                time.sleep(0.01)
        signalled = time.monotonic()
        served.signal(signal.SIGTERM)
        code = served.stop(timeout=60)
        for thread in threads:
            thread.join(timeout=60)
    finally:
        served.kill()

    assert in_flight >= 1, "every request had finished before SIGTERM: the test proved nothing"
    assert sorted(answers) == list(range(REQUESTS))
    assert all(status == 200 and images == SAMPLES for status, images, _ in answers.values()), answers
    after = sum(done > signalled for _, _, done in answers.values())
    assert after >= 1, "no request was answered after SIGTERM"
    log = served.log()
    assert clean_exit(code), log
    assert "Application shutdown complete" in log and "Traceback" not in log
    # uvicorn logs "Shutting down" on the signal, then waits for the requests in flight.
    assert log.index("Shutting down") < log.index("Application shutdown complete")
