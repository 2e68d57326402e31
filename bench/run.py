"""The serving benchmark: the service against a plain FastAPI app and against its own ceiling.

    make bench                      # the full run, several minutes
    python -m bench --quick         # short runs, for iterating (figures are rougher)
    python -m bench --only ours --set VAE_BATCH_MAX_SIZE=16     # try a setting

Three servers, one after the other, each alone on the machine, on loopback:

- `ours`: vae-serve with the shipped default model (`mnist`), its default settings except
  the access log (off, as under any real load) and those given with --set;
- `plain`: bench/plain_app.py, the same TorchScript model once per request in sync
  endpoints, Pillow PNGs, the same JSON (how most tutorials serve a model);
- `ceiling`: bench/ceiling.py, the service's own app and server with one more route that
  answers a constant body as large as W1's answer: what the stack alone can do.

The load generator is wrk (Debian's `wrk` package), one thread, pinned to the second core
(`taskset -c 1`) when taskset exists; the servers are not pinned. wrk's own CPU time is
measured and printed. Workloads (each: a warm-up, then the measured run):

    W1  POST /sample {"n": 1}                 32 connections
    W2  POST /sample {"n": 64}                 8 connections
    W3  POST /encode one 28x28 PNG            32 connections
    W4  POST /reconstruct one 28x28 PNG       32 connections
    W1s POST /sample {"n": 1, "prior": "standard"}    (ours only)
    W2s POST /sample {"n": 64, "prior": "standard"}   (ours only)

W1 and W2 draw through the model's default prior (the learned one, where it has one); W1s
and W2s through the standard prior, so the learned prior's cost is their ratio.

Then, for `ours`: the time from process start to ready, the first request after ready
against the median of the next ones, and the RSS before and after a 60 s W1 run. Figures
are only meaningful on a quiet machine: the load average is printed at the start and the
end, with a warning when the machine was busy.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import http.client
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
LUA = Path(__file__).resolve().parent / "lua" / "post.lua"
MNIST_TEST = ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 300.0
BUSY_LOAD = 0.5  # 1-minute load average above which the figures are flagged


@dataclass(frozen=True)
class Workload:
    key: str
    path: str
    body: str  # file name in the work directory
    connections: int
    images: int  # per request


WORKLOADS = (
    Workload("W1", "/sample", "sample1.json", 32, 1),
    Workload("W2", "/sample", "sample64.json", 8, 64),
    Workload("W3", "/encode", "digit.json", 32, 1),
    Workload("W4", "/reconstruct", "digit.json", 32, 1),
    # W1 and W2 through the standard prior, z = u, on our server only: against W1 and W2 (the
    # model's default prior, the learned one where it has one), what the learned prior costs.
    Workload("W1s", "/sample", "sample1-standard.json", 32, 1),
    Workload("W2s", "/sample", "sample64-standard.json", 8, 64),
)
OURS_ONLY = ("W1s", "W2s")


@dataclass
class Result:
    server: str
    workload: str
    rps: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    loadgen_cores: float  # wrk's CPU seconds per second of run
    raw: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the machine


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit(
            "bench: the load generator `wrk` is not installed. Install it with "
            "`sudo apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk` (macOS), then run again."
        )
    return wrk


# ---------------------------------------------------------------------------- bodies


def digit_png() -> bytes:
    """One real MNIST test digit as a 28x28 PNG when ../shared has MNIST, else a drawn 7."""
    if MNIST_TEST.is_file():
        with gzip.open(MNIST_TEST, "rb") as f:
            f.read(16)
            pixels = np.frombuffer(f.read(28 * 28), np.uint8).reshape(28, 28)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("L", (28, 28), 0)
        ImageDraw.Draw(image).line([(8, 7), (20, 7), (12, 22)], fill=255, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_bodies(work: Path) -> None:
    (work / "sample1.json").write_text(json.dumps({"n": 1}))
    (work / "sample64.json").write_text(json.dumps({"n": 64}))
    (work / "sample1-standard.json").write_text(json.dumps({"n": 1, "prior": "standard"}))
    (work / "sample64-standard.json").write_text(json.dumps({"n": 64, "prior": "standard"}))
    (work / "digit.json").write_text(json.dumps({"images": [base64.b64encode(digit_png()).decode()]}))


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    startup_s: float
    log: Path

    def request(self, path: str, body: bytes, conn: http.client.HTTPConnection | None = None) -> bytes:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{self.name} {path} answered {response.status}: {data[:300]!r}")
            return data
        finally:
            if own:
                conn.close()


def start(name: str, argv: list[str], env: dict[str, str], work: Path) -> Server:
    port = free_port()
    argv = [arg.replace("{port}", str(port)) for arg in argv]
    log = work / f"{name}.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = started + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(
                f"bench: the {name} server exited with status {process.returncode}; "
                f"its log:\n{log.read_text()}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                conn.close()
                return Server(name, process, port, time.monotonic() - started, log)
            conn.close()
        time.sleep(0.005)
    stop(Server(name, process, port, 0.0, log))
    sys.exit(f"bench: the {name} server was not ready after {STARTUP_TIMEOUT:.0f} s; its log is {log}")


def stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextlib.contextmanager
def running(name: str, argv: list[str], env: dict[str, str], work: Path) -> Iterator[Server]:
    server = start(name, argv, env, work)
    try:
        yield server
    finally:
        stop(server)


def uvicorn_argv(target: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", target, *extra,
        "--host", "127.0.0.1", "--port", "{port}", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


# ---------------------------------------------------------------------------- load


def wrk_run(
    wrk: str, server: Server, workload: Workload, work: Path, seconds: float, accept: str = ""
) -> dict[str, Any]:
    argv = [
        wrk, "-t1", f"-c{workload.connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
        "-s", str(LUA), f"http://127.0.0.1:{server.port}{workload.path}",
    ]  # fmt: skip
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "1", *argv]
    env = {**os.environ, "BODY_FILE": str(work / workload.body), "ACCEPT": accept}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate()  # waited for: its CPU time now counts in RUSAGE_CHILDREN
    text = output.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary; its output:\n{text}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    wrk: str, server: Server, workload: Workload, work: Path, seconds: float, warmup: float
) -> Result:
    if warmup > 0:
        wrk_run(wrk, server, workload, work, warmup)
    before = children_cpu()
    raw = wrk_run(wrk, server, workload, work, seconds)
    wrk_cpu = children_cpu() - before
    duration = raw["duration_us"] / 1e6
    errors = sum(
        raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    ok = raw["requests"] - raw["status_errors"]
    rps = ok / duration
    return Result(
        server.name,
        workload.key,
        rps,
        rps * workload.images,
        raw["p50_us"] / 1000,
        raw["p99_us"] / 1000,
        errors,
        wrk_cpu / duration,
        raw,
    )


def first_request_vs_median(server: Server, work: Path) -> dict[str, float]:
    """The first /sample after ready (on a connection opened beforehand); the median of 50
    back-to-back ones; and the median of 5 that each follow 1 s of idleness, as the first
    does (caches and an idle CPU cost an idle server's next request a few ms, whether or
    not it is the first: that part is not warm-up)."""
    body = (work / "sample1.json").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.connect()

    def timed() -> float:
        started = time.perf_counter()
        server.request("/sample", body, conn)
        return (time.perf_counter() - started) * 1000

    first = timed()
    hot = [timed() for _ in range(50)]
    idle = []
    for _ in range(5):
        time.sleep(1.0)
        idle.append(timed())
    conn.close()
    return {"first_ms": first, "median_ms": statistics.median(hot), "idle_median_ms": statistics.median(idle)}


# ---------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s runs, 10 s soak: for iterating")
    parser.add_argument("--duration", type=float, help="seconds per measured run (default 15; --quick 5)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each measured run (default 3)")
    parser.add_argument("--soak", type=float, help="seconds of W1 for the RSS check (default 60; --quick 10)")
    parser.add_argument("--model-store", default=str(ROOT / "model_store"), help="the store to serve")
    parser.add_argument("--model", default="mnist", help="the model to serve (default: the shipped mnist)")
    parser.add_argument(
        "--only", choices=["ours", "plain", "ceiling"], action="append", help="run only these servers"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAE_NAME=VALUE",
        help="a setting for our server (repeatable), e.g. --set VAE_BATCH_MAX_SIZE=16",
    )
    parser.add_argument(
        "--workload", choices=[w.key for w in WORKLOADS], action="append", help="run only these workloads"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    duration = args.duration or (5.0 if args.quick else 15.0)
    warmup = 3.0 if args.warmup is None else args.warmup
    soak = args.soak or (10.0 if args.quick else 60.0)
    servers = args.only or ["plain", "ours", "ceiling"]
    workloads = [w for w in WORKLOADS if not args.workload or w.key in args.workload]
    wrk = require_wrk()
    store = Path(args.model_store)
    versions = sorted(
        (store / args.model).glob("v*"), key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else -1
    )
    if not versions:
        sys.exit(f"bench: no model {args.model!r} in {store}; train it (make model) or pass --model-store")
    model_dir = versions[-1]
    overrides = dict(item.split("=", 1) for item in args.set)
    load_start = load_average()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average at start {load_start}")
    if os.getloadavg()[0] > BUSY_LOAD:
        print(
            f"WARNING: the machine is busy (1-min load {os.getloadavg()[0]:.2f} > {BUSY_LOAD}); "
            "figures are not meaningful"
        )
    print(f"model: {model_dir.relative_to(store.parent) if store.parent in model_dir.parents else model_dir}")
    print(
        f"runs: {duration:.0f} s measured after {warmup:.0f} s warm-up; "
        f"wrk -t1, pinned to core 1; soak {soak:.0f} s"
    )
    if overrides:
        print(f"settings for ours: {overrides}")
    results: list[Result] = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        work = Path(tmp)
        write_bodies(work)
        w1_bytes = 0
        if "plain" in servers:
            env = clean_env(VAE_BENCH_MODEL=str(model_dir))
            with running("plain", uvicorn_argv("bench.plain_app:app"), env, work) as server:
                for workload in (w for w in workloads if w.key not in OURS_ONLY):
                    results.append(measure(wrk, server, workload, work, duration, warmup))
                    print(_line(results[-1]), flush=True)
        if "ours" in servers:
            env = clean_env(
                **{
                    "VAE_MODEL_STORE": str(store),
                    "VAE_MODELS": args.model,
                    "VAE_ACCESS_LOG": "false",
                    **overrides,
                }
            )
            argv = [str(BIN / "vae-serve"), "--port", "{port}", "--log-level", "warning"]
            with running("ours", argv, env, work) as server:
                extra["startup_s"] = server.startup_s
                extra.update(first_request_vs_median(server, work))
                w1_bytes = len(server.request("/sample", (work / "sample1.json").read_bytes()))
                for workload in workloads:
                    results.append(measure(wrk, server, workload, work, duration, warmup))
                    print(_line(results[-1]), flush=True)
                # RSS: after the warm-up above, then after a long W1 run.
                extra["rss_before_mib"] = rss_mib(server.process.pid)
                soaked = measure(wrk, server, WORKLOADS[0], work, soak, 0)
                extra["rss_after_mib"] = rss_mib(server.process.pid)
                extra["soak_rps"] = soaked.rps
        if "ceiling" in servers:
            env = clean_env(
                VAE_MODEL_STORE=str(store),
                VAE_MODELS=args.model,
                VAE_BENCH_BODY_BYTES=str(w1_bytes or 1100),
            )
            ceiling = Workload("W1", "/constant", "sample1.json", 32, 1)
            with running("ceiling", uvicorn_argv("bench.ceiling:create", "--factory"), env, work) as server:
                results.append(measure(wrk, server, ceiling, work, duration, warmup))
                print(_line(results[-1]), flush=True)
    report(results, extra, load_start)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": cpu_name(),
                    "cores": os.cpu_count(),
                    "load_average_start": load_start,
                    "load_average_end": load_average(),
                    "settings": overrides,
                    "duration_s": duration,
                    "results": [r.__dict__ for r in results],
                    **extra,
                },
                indent=2,
            )
        )


def _line(r: Result) -> str:
    return (
        f"  {r.server:8s} {r.workload}: {r.rps:8.0f} req/s {r.images_per_s:9.0f} img/s "
        f"p50 {r.p50_ms:6.2f} ms p99 {r.p99_ms:6.2f} ms errors {r.errors} (wrk {r.loadgen_cores:.2f} cores)"
    )


def report(results: list[Result], extra: dict[str, Any], load_start: str) -> None:
    by = {(r.server, r.workload): r for r in results}
    print()
    print(
        f"{'workload':10s} {'server':8s} {'req/s':>8s} {'images/s':>9s} "
        f"{'p50 ms':>7s} {'p99 ms':>7s} {'errors':>6s}"
    )
    for r in results:
        print(
            f"{r.workload:10s} {r.server:8s} {r.rps:8.0f} {r.images_per_s:9.0f} {r.p50_ms:7.2f} "
            f"{r.p99_ms:7.2f} {r.errors:6d}"
        )
    print()
    checks: list[tuple[str, float, str, bool]] = []

    def ratio(label: str, a: float, b: float, target: float, unit: str = "x") -> None:
        value = a / b if b else float("nan")
        checks.append((label, value, f">= {target:g}{unit}", value >= target))

    ours = {w.key: by.get(("ours", w.key)) for w in WORKLOADS}
    plain = {w.key: by.get(("plain", w.key)) for w in WORKLOADS}
    ceiling = by.get(("ceiling", "W1"))
    for key, what in (("W1", "req/s"), ("W2", "images/s"), ("W3", "req/s"), ("W4", "req/s")):
        o, p = ours[key], plain[key]
        if o and p:
            target = {"W1": 3.0, "W2": 2.0, "W3": 2.0, "W4": 2.0}[key]
            a, b = (o.images_per_s, p.images_per_s) if what == "images/s" else (o.rps, p.rps)
            ratio(f"{key} ours / plain ({what})", a, b, target)
    for key in ("W2", "W3", "W4"):  # reported, no target
        o, c = ours[key], ceiling
        if o and c:
            checks.append((f"{key} ours / ceiling (req/s)", o.rps / c.rps, "-", True))
    if ours["W1"] and ceiling:
        ratio("W1 ours / ceiling (req/s)", ours["W1"].rps, ceiling.rps, 0.5)
    for key, standard, what in (("W1", "W1s", "req/s"), ("W2", "W2s", "images/s")):
        o, s = ours[key], ours[standard]
        if o and s:
            a, b = (o.images_per_s, s.images_per_s) if what == "images/s" else (o.rps, s.rps)
            ratio(f"{key} default prior / standard prior ({what})", a, b, 0.9)
    if ours["W1"]:
        p99 = ours["W1"].p99_ms
        checks.append(("W1 ours p99 (ms)", p99, "<= 25", p99 <= 25.0))
    if plain["W1"] and ceiling:
        checks.append(("W1 plain / ceiling (req/s)", plain["W1"].rps / ceiling.rps, "-", True))
    if "startup_s" in extra:
        checks.append(("startup: process start to ready (s)", extra["startup_s"], "-", True))
        first, hot, idle = extra["first_ms"], extra["median_ms"], extra["idle_median_ms"]
        checks.append(("request after ready: first (ms)", first, "-", True))
        checks.append(("  median of 50 back-to-back (ms)", hot, "-", True))
        checks.append(
            (
                "  median of 5 each after 1 s idle (ms)",
                idle,
                f">= first / 1.25 = {first / 1.25:.2f}",
                first <= idle * 1.25,
            )
        )
        before, after = extra["rss_before_mib"], extra["rss_after_mib"]
        growth = (after - before) / before
        checks.append(
            (
                f"RSS before / after soak (MiB) {before:.0f} -> {after:.0f}",
                growth * 100,
                "<= 10 %",
                growth <= 0.10,
            )
        )
    for label, value, target, ok in checks:
        verdict = "" if target == "-" else ("PASS" if ok else "FAIL")
        print(f"{label:52s} {value:9.2f}   {target:28s} {verdict}")
    loadgen = max((r.loadgen_cores for r in results), default=0.0)
    print(f"\nload generator: wrk -t1, at most {loadgen:.2f} cores of CPU during a run")
    print(f"load average at start {load_start}, at end {load_average()}")
    if os.getloadavg()[0] > BUSY_LOAD:
        print("WARNING: the machine was busy; re-run on a quiet machine for figures to report")
