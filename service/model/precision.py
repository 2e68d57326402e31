"""VAE_PRECISION: which precision each model's decoder computes in, chosen at load time.

- `fp32`: the artifact's own precision, everywhere.
- `bf16` / `fp16`: the decoder's weights converted once to that type (not autocast on every
  pass); encode, the priors and the classifier stay fp32 (a verdict must not depend on the
  precision it judges). The quality check below runs and is reported, but does not veto.
- `auto` (the default): the lower precision only where this machine has it natively (bf16:
  a CPU with AVX512-BF16 or AMX, read from the CPU's flags; on CUDA bf16 where the GPU has it,
  else fp16), where the warm-up measures its pass faster than fp32's, and where it passes the
  quality check: the shipped classifier's verdicts on CHECK_DRAWS draws of the model's default
  prior agree with fp32's for at least AGREEMENT_NEEDED of them. Otherwise fp32.

The choice is made before the batcher calibrates its pass sizes, so calibration, warm-up and
every pass run in the precision chosen: requests stay bit for bit the same, batched or not,
within one precision. What was measured is kept on the runtime (`precision_check`) and shown
by /models.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.artifact import LEARNED_PRIOR

log = logging.getLogger("service.model.precision")

CHECK_DRAWS = 5000  # draws judged in both precisions (issue 26)
AGREEMENT_NEEDED = 0.995  # share of draws whose verdict must not change
TIMED_ROWS = 32  # the pass timed in both precisions: a busy server's
CPU_FLAGS = Path("/proc/cpuinfo")


class Switchable(Protocol):
    """What this module needs of a runtime (service.model.runtime.TorchRuntime)."""

    name: str
    latent_dim: int
    priors: tuple[str, ...]
    conditional: bool
    has_classifier: bool
    low_precision: str | None
    precision: str

    def decode_in(self, precision: str, z: np.ndarray) -> np.ndarray: ...
    def prior(self, rows: np.ndarray) -> np.ndarray: ...
    def classify(self, x: np.ndarray) -> np.ndarray: ...
    def use_precision(self, precision: str, check: dict[str, Any]) -> None: ...


def native_lower_precision(device: torch.device) -> str | None:
    """The lower precision this device computes natively, or None."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if _cpu_has_native_bf16() else None
    return None


def _cpu_has_native_bf16() -> bool:
    try:
        text = CPU_FLAGS.read_text()
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lower_precision_to_load(setting: str, device: torch.device, measured: bool = True) -> str | None:
    """Which lower precision a runtime must load beside fp32 for this setting (None: none).
    `auto` loads one only where it will be measured (at warm-up)."""
    if setting in ("bf16", "fp16"):
        return setting
    if setting == "auto" and measured:
        return native_lower_precision(device)
    return None


def choose(runtime: Switchable, setting: str, draws: int = CHECK_DRAWS, measure: bool = True) -> None:
    """Measures the loaded lower precision against fp32 and tells the runtime which to use.
    Without `measure` (VAE_WARMUP=false) an explicit lower precision is used as asked, unchecked,
    and `auto` stays fp32."""
    low = runtime.low_precision
    if setting == "fp32" or low is None:
        if setting == "fp32":
            reason = "VAE_PRECISION=fp32"
        elif not measure:
            reason = "auto: not measured (VAE_WARMUP=false), so fp32"
        else:
            reason = "auto: this device has no native lower precision (a CPU's bf16 needs AVX512-BF16 or AMX)"
        runtime.use_precision("fp32", {"setting": setting, "reason": reason})
        return
    if not measure:
        reason = f"VAE_PRECISION={low}, not measured (VAE_WARMUP=false)"
        runtime.use_precision(low, {"setting": setting, "reason": reason})
        return
    check = {"setting": setting, "candidate": low, **_timings(runtime, low)}
    check.update(_quality(runtime, low, draws))
    faster = check["pass_ms"][low] < check["pass_ms"]["fp32"]
    agrees = check.get("agreement") is not None and check["agreement"] >= AGREEMENT_NEEDED
    if setting == low:
        chosen, reason = low, f"VAE_PRECISION={low}"
        if check.get("agreement") is not None and not agrees:
            log.warning(
                "model %s decodes in %s as VAE_PRECISION asks, but the classifier's verdicts agree with "
                "fp32's on only %.2f%% of %d draws (auto would need %.1f%%)",
                runtime.name, low, 100 * check["agreement"], check["draws"], 100 * AGREEMENT_NEEDED,
            )  # fmt: skip
    elif not faster:
        chosen, reason = "fp32", f"auto: {low} measured no faster here"
    elif check.get("agreement") is None:
        chosen, reason = "fp32", f"auto: no classifier to check {low}'s draws with"
    elif not agrees:
        chosen, reason = (
            "fp32",
            f"auto: {low}'s verdicts agree with fp32's on fewer than {AGREEMENT_NEEDED:.1%}",
        )
    else:
        chosen, reason = low, f"auto: {low} is faster here and its verdicts agree with fp32's"
    check["reason"] = reason
    runtime.use_precision(chosen, check)
    log.info("model %s decodes in %s (%s; passes %s ms)", runtime.name, chosen, reason, check["pass_ms"])


def _timings(runtime: Switchable, low: str, rounds: int = 15) -> dict[str, Any]:
    """The median time of a TIMED_ROWS-row decode pass in each precision, interleaved."""
    z = np.random.default_rng(0).standard_normal((TIMED_ROWS, runtime.latent_dim), dtype=np.float32)
    times: dict[str, list[float]] = {"fp32": [], low: []}
    for _ in range(3):  # the first calls of each precision compile and allocate
        for precision in times:
            runtime.decode_in(precision, z)
    for _ in range(rounds):
        for precision in times:
            started = time.perf_counter()
            runtime.decode_in(precision, z)
            times[precision].append(time.perf_counter() - started)
    return {
        "pass_rows": TIMED_ROWS,
        "pass_ms": {p: round(1e3 * statistics.median(t), 3) for p, t in times.items()},
    }


def _quality(runtime: Switchable, low: str, draws: int) -> dict[str, Any]:
    """Draws of the default prior decoded in both precisions: the largest pixel difference and,
    with a classifier, the share whose verdict (the most probable class) is the same."""
    rng = np.random.default_rng(20261206)
    u = rng.standard_normal((draws, runtime.latent_dim), dtype=np.float32)
    if LEARNED_PRIOR in runtime.priors:
        rows = np.concatenate([u, np.ones((draws, 1), np.float32), -np.ones((draws, 1), np.float32)], axis=1)
        z = np.concatenate([runtime.prior(rows[s : s + 256]) for s in range(0, draws, 256)])
    else:
        z = u
    largest, same = 0.0, 0
    for start in range(0, draws, 256):
        chunk = z[start : start + 256]
        exact, lower = runtime.decode_in("fp32", chunk), runtime.decode_in(low, chunk)
        largest = max(largest, float(np.abs(exact - lower).max()))
        if runtime.has_classifier:
            same += int((runtime.classify(exact).argmax(1) == runtime.classify(lower).argmax(1)).sum())
    result: dict[str, Any] = {"draws": draws, "largest_pixel_difference": round(largest, 6)}
    result["agreement"] = round(same / draws, 5) if runtime.has_classifier else None
    return result
