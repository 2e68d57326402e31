"""Prometheus metrics, in a registry of their own per app (several apps in one test
process must not share counters). service.edge.request_metrics counts the requests."""

from __future__ import annotations

from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# When the request being handled arrived (time.perf_counter()), set by
# service.edge.request_metrics for the task that serves it: service.model.inference measures
# VAE_REQUEST_TIMEOUT_S from it, so time spent waiting for a thread to parse the body or in a
# model's queue counts too.
REQUEST_STARTED: ContextVar[float | None] = ContextVar("vae_request_started", default=None)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vae_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vae_http_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("vae_http_requests_in_flight", "Requests being handled now.", registry=r)
        # Slow or greedy clients (service.edge): bodies answered 408 because they arrived too
        # slowly, and requests answered 429 because their client address held its share already.
        self.body_timeouts = Counter(
            "vae_http_body_timeouts_total",
            "Requests answered 408 because their body did not arrive in time, by the limit hit: "
            "rate (VAE_BODY_TIMEOUT_S plus a second per VAE_BODY_MIN_RATE bytes), idle "
            "(VAE_BODY_TIMEOUT_S without a byte) or total (VAE_BODY_TIMEOUT_MAX_S).",
            ["limit"],
            registry=r,
        )
        self.client_refusals = Counter(
            "vae_http_client_refusals_total",
            "Requests answered 429 because their client address already had its share of "
            "VAE_MAX_CONCURRENT_REQUESTS in flight (VAE_MAX_CLIENT_SHARE).",
            registry=r,
        )
        self.inference = Histogram(
            "vae_model_inference_seconds",
            "Time a model call ran on its worker thread.",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vae_model_queue_seconds",
            "Time a model call waited for a worker thread.",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vae_model_batch_size",
            "Images or latents per model call (with batching: per merged forward pass).",
            ["model", "op"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Micro-batching (service.model.batching): how many zero rows pad the passes, how many
        # requests share a pass, how many rows wait, and how many requests were turned away
        # with 503 because the queue was full.
        self.padding_rows = Counter(
            "vae_model_padding_rows_total",
            "Zero rows added to passes to reach a shape at which every row comes out exactly as "
            "alone (VAE_BATCH_EXACT; the work wasted on them, against vae_model_batch_size_sum).",
            ["model", "op"],
            registry=r,
        )
        self.batch_requests = Histogram(
            "vae_model_batch_requests",
            "Requests merged into one model call.",
            ["model", "op"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queued_rows = Gauge(
            "vae_model_queued_rows",
            "Images or latents waiting for a model call.",
            ["model", "op"],
            registry=r,
        )
        self.rejected = Counter(
            "vae_model_rejected_total",
            "Requests refused with 503 because the model's queue was full (VAE_QUEUE_MAX).",
            ["model", "op"],
            registry=r,
        )
        self.timeouts = Counter(
            "vae_model_timeouts_total",
            "Requests answered 503 because the model had not answered within VAE_REQUEST_TIMEOUT_S.",
            ["model", "op"],
            registry=r,
        )
        # min_confidence: draws the classifier did not accept, drawn again; and requests refused
        # because some draw was still not accepted after VAE_MAX_DRAW_ATTEMPTS attempts.
        self.redraws = Counter(
            "vae_sample_redraws_total",
            "Draws replaced by fresh ones because the classifier read them below min_confidence.",
            ["model"],
            registry=r,
        )
        self.unreached = Counter(
            "vae_sample_min_confidence_unreached_total",
            "Requests answered 422 min-confidence-not-reached (VAE_MAX_DRAW_ATTEMPTS used up).",
            ["model"],
            registry=r,
        )
        # Faults (service.model.faults): requests answered 500 model-failed because the model raised
        # (reason="error") or returned NaN or infinity (reason="non_finite").
        self.model_failures = Counter(
            "vae_model_failures_total",
            "Requests whose model call raised or returned NaN/infinity (answered 500 model-failed).",
            ["model", "op", "reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "vae_model_info",
            "Loaded models (value 1).",
            ["model", "version", "latent_dim", "device"],
            registry=r,
        )
        self.ready = Gauge(
            "vae_ready", "1 once the models are loaded and warmed up, 0 otherwise.", registry=r
        )
        # Reloads (service.model.reload): one count per model version tried, so an alert on
        # result="refused" fires when a deploy put a broken artifact in the store.
        self.reloads = Counter(
            "vae_model_reloads_total",
            "Model versions tried by a reload, by result (loaded or refused).",
            ["model", "result"],
            registry=r,
        )
        self.reload_runs = Counter(
            "vae_reload_runs_total",
            "Reloads run, by trigger (api or sighup).",
            ["trigger"],
            registry=r,
        )
