"""Every setting of the service, in one place: read from VAE_* environment variables.

`vae-serve` exposes each field as a command-line option too (`--max-images 64` for
VAE_MAX_IMAGES=64); docs/service.md has the table. Limits live here, not in the request
schemas, so that an operator can change them without touching code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_STORE = Path(__file__).resolve().parents[1] / "model_store"
DEVICES = ("auto", "cpu", "cuda", "mps")


def _split_list(value: Any) -> Any:
    """Lists come from the environment as `a,b` or as a JSON array `["a", "b"]`."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore", validate_default=True)

    model_store: Path = Field(DEFAULT_STORE, description="Directory holding <name>/<version>/ artifacts.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to load, comma-separated; `name` takes the latest version, `name:v3` pins one. "
        "Empty: every model in the store, latest versions.",
    )
    default_model: str = Field(
        "mnist",
        description="Model used when a request names none; "
        "falls back to the first loaded model when this one is not loaded.",
    )
    device: str = Field("auto", description="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.")
    runtime: Literal["torchscript", "export"] = Field(
        "torchscript",
        description="Which of an artifact's files run: `torchscript`, model.pt (the contract's format); "
        "`export`, its torch.export programs (model.pt2, classifier.pt2), which artifacts written since "
        "issue 26 carry. A model without them is refused under `export`.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="What the decoder computes in: `fp32`; `bf16` or `fp16` (weights converted once); "
        "`auto`, the device's native lower precision (bf16 on a CPU with AVX512-BF16 or AMX; bf16 or "
        "fp16 on CUDA) where the warm-up measures it faster and the classifier's verdicts on "
        "VAE_PRECISION_CHECK_DRAWS draws agree with fp32's for 99.5% of them, else fp32. /models says "
        "which each model uses and why.",
    )
    precision_check_draws: int = Field(
        5000,
        ge=100,
        le=100_000,
        description="Draws decoded in both precisions to check a lower one (VAE_PRECISION).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads (torch.set_num_threads); "
        "0 leaves torch's default (one per physical core).",
    )
    inference_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Worker threads that run model calls, each pass using torch_threads; with "
        "batching, a second pass runs beside a first only for a full batch (docs/performance.md).",
    )
    # Micro-batching (service.model.batching); the defaults are measured in docs/performance.md.
    batching: bool = Field(
        True, description="Merge concurrent requests for the same model and operation into one forward pass."
    )
    batch_max_size: int = Field(
        32, ge=1, le=4096, description="Most images or latents in one merged forward pass."
    )
    batch_max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="How long a free inference thread waits for more requests to fill a batch, in ms; "
        "0 takes what is queued (requests still merge while the threads are busy).",
    )
    batch_fill_wait_ms: float = Field(
        5.0,
        ge=0.0,
        le=1000.0,
        description="How long a free inference thread waits for a batch that is at least half full "
        "to fill up, in ms (a busy server: the rest is on its way, and a full pass costs about as "
        "much CPU as a half-full one); 0: never.",
    )
    batch_exact: bool = Field(
        True,
        description="Run every forward pass at a shape where each row comes out bit for bit as it "
        "would alone (zero-padded up to it), so that results are the same whichever requests share "
        "a batch.",
    )
    batch_pass_sizes: Literal["calibrated", "fixed"] = Field(
        "calibrated",
        description="With batch_exact, which pass shapes: `calibrated`, the row counts that the "
        "model, measured at startup on this device, computes bit for bit as in a pass of "
        "batch_max_size rows (a pass is padded to the next one); `fixed`, every pass "
        "batch_max_size rows (the scheme before calibration, twice the CPU at half-full batches).",
    )
    queue_max: int = Field(
        2048,
        ge=1,
        description="Most images or latents waiting per model and operation; "
        "beyond it requests get 503 with Retry-After.",
    )
    request_timeout_s: float = Field(
        30.0,
        ge=0.0,
        description="Longest a request may take, from its arrival, until the model has computed its "
        "answer (queueing included); past it the request gets 503 with Retry-After and its queued "
        "work is dropped. 0: no limit.",
    )
    max_concurrent_requests: int = Field(
        64,
        ge=0,
        description="Most requests handled at once (probes and /metrics aside); beyond it requests "
        "get 503 with Retry-After before their bodies are read, which bounds the memory a flood of "
        "uploads can take. 0: no limit.",
    )
    max_client_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Largest share of VAE_MAX_CONCURRENT_REQUESTS that the requests of one client address "
        "may hold at once (at least one request); beyond it that client gets 429 with Retry-After while "
        "others are still admitted, so a few sockets cannot take every slot. 1: no per-client limit.",
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxies trusted to name the client in X-Forwarded-For, comma-separated addresses or "
        "networks (10.0.0.0/8), or * for any peer: a request from one of them counts against the last "
        "address in X-Forwarded-For that is not itself a trusted proxy. Empty: the peer's own address, "
        "whatever the headers say (set it behind a balancer, or every client looks like the balancer).",
    )
    body_timeout_s: float = Field(
        10.0,
        ge=0.0,
        le=3600.0,
        description="Time a request body may take to arrive, from the request's headers, before the "
        "bytes that arrive extend it (VAE_BODY_MIN_RATE), and the longest it may pause without a "
        "byte; past either the request gets 408 and its connection is closed, freeing its slot. "
        "0: no deadline.",
    )
    body_min_rate: int = Field(
        4096,
        ge=1,
        description="Bytes per second a body must keep arriving at: every this many bytes received "
        "add one second to VAE_BODY_TIMEOUT_S (Apache mod_reqtimeout's MinRate).",
    )
    body_timeout_max_s: float = Field(
        300.0,
        gt=0.0,
        le=86400.0,
        description="Longest any request body may take to arrive, however fast its bytes come; the "
        "largest body (VAE_MAX_BODY_BYTES) must fit: 8 MiB in 300 s needs 28 KB/s on average.",
    )
    access_log: bool = Field(True, description="Log one line per request (uvicorn's access log).")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413).")
    max_images: int = Field(256, ge=1, description="Most images (or latent rows for /decode) in one request.")
    max_samples: int = Field(1024, ge=1, description="Largest n for /sample and /sample.png.")
    max_draw_attempts: int = Field(
        10,
        ge=1,
        le=100,
        description="With min_confidence, how many times a draw is made at most (the first and the "
        "redraws) before the request is refused with 422 min-confidence-not-reached.",
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=28 * 28,
        description="Largest width*height of an uploaded "
        "image, checked before its pixels are decoded (decompression bombs).",
    )
    max_request_pixels: int = Field(
        4 * 4096 * 4096,
        ge=28 * 28,
        description="Most pixels (the sum of width*height) one request's images may decode to, "
        "checked image by image before each is decoded: bounds the CPU one request can cost.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS, comma-separated; `*` allows any. Empty: CORS off.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, every endpoint but /healthz, /readyz, /docs, "
        "/openapi.json and the explorer page's files (/, /static) needs header `X-API-Key: <key>` or "
        "`Authorization: Bearer <key>`.",
    )
    warmup: bool = Field(True, description="Run each model once at startup, before reporting ready.")
    allow_reload_without_key: bool = Field(
        False,
        description="Let POST /admin/reload run when no API key is set (otherwise it answers 403): "
        "only for a server that nobody but its operators can reach. SIGHUP needs no key.",
    )

    @field_validator("models", "cors_origins", "forwarded_allow_ips", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        base, _, index = value.partition(":")
        if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("api_key")
    @classmethod
    def _empty_key_means_none(cls, value: SecretStr | None) -> SecretStr | None:
        # VAE_API_KEY= (set but empty) must not turn on a key that every client trivially matches.
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _body_deadlines_in_order(self) -> Settings:
        if self.body_timeout_s > self.body_timeout_max_s:
            raise ValueError(
                f"body_timeout_s ({self.body_timeout_s}) is longer than body_timeout_max_s "
                f"({self.body_timeout_max_s}), the most any body may take: raise the second or lower "
                "the first"
            )
        return self

    def per_client_limit(self) -> int:
        """Most requests one client address may have in flight (0: no limit)."""
        if not self.max_concurrent_requests or self.max_client_share >= 1.0:
            return 0
        return max(1, int(self.max_client_share * self.max_concurrent_requests))

    def model_specs(self) -> list[tuple[str, str | None]]:
        """The configured models as (name, pinned version or None)."""
        specs = []
        for item in self.models:
            name, _, version = item.partition(":")
            specs.append((name.strip(), version.strip() or None))
        return specs
