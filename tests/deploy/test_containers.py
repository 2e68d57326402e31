"""The container images and the compose deployment, for real: built from the Dockerfile, started
with the compose file's hardening, run through Compose (train, reload, shut down, start again),
and scaled out behind the balancer with a rolling restart and a killed replica under load.

The engine is Podman (tests/container_support.py says how it is set up and why); where it
cannot run, every test here skips with one line saying why (`make image-test` runs only these).
The figures go to tests/output/images.json, docs/deployment.md quotes them."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from container_support import (
    IMAGES,
    ROOT,
    TAG,
    Built,
    Compose,
    Engine,
    compose_binary,
    prebuilt,
)
from datasets import write_dataset
from deploy_files import image_uid, one, render
from process_support import BackgroundClients, free_port, metric
from service_support import b64, drawn_digit, encoded, png

from bench.slow_clients import Report, attack
from tests import reliability
from tests.conftest import HAS_MNIST, MNIST_DIR

pytestmark = [pytest.mark.slow, pytest.mark.containers]

UID = str(image_uid())
API, TRAINER, BALANCER = IMAGES["api"], IMAGES["trainer"], IMAGES["balancer"]
OUTPUT = ROOT / "tests" / "output" / "images.json"
# What the serving image must not hold: plotting, progress bars, test tools, compilers.
NOT_IN_API = ("matplotlib", "tqdm", "pytest", "hypothesis", "schemathesis", "ruff", "mypy", "playwright")
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "make")
# A trainer run that takes seconds: the point is the volume, the owner and the reload.
TINY_TRAINING = ["--epochs", "1", "--limit-train", "2000", "--limit-test", "500", "--batch-size", "100",
                 "--latent-dim", "4", "--channels", "8", "--hidden", "32", "--iwae-k", "10",
                 "--prior-components", "2", "--prior-iterations", "3", "--prior-nll-images", "10",
                 "--no-prior", "--no-progress"]  # fmt: skip

figures: dict[str, object] = {}


def row(tried: str, count: int, result: str) -> None:
    """A row of the README's Reliability table, credited to the test that is running."""
    test = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]
    reliability.record("deployment", tried, count, result, f"test_containers.py::{test}")


def save_figures() -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(OUTPUT.read_text()) if OUTPUT.is_file() else {}
    OUTPUT.write_text(json.dumps({**previous, **figures}, indent=1) + "\n")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images() -> dict[str, Built]:
    """Built in the background since the session started (container_support.Prebuild)."""
    prebuild = prebuilt()
    waited = time.monotonic()
    built = prebuild.wait()
    figures["builds_waited_for_seconds"] = round(time.monotonic() - waited, 1)
    figures["images"] = {
        name: {"tag": b.image, "bytes": b.size, "build_seconds": round(b.seconds, 1)}
        for name, b in built.items()
    }
    save_figures()
    return built


@pytest.fixture(scope="module")
def podman(images: dict[str, Built]) -> Iterator[Engine]:
    found = prebuilt().podman()
    found.start_docker_api()
    yield found
    found.close()
    shutil.rmtree(found.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(podman: Engine) -> tuple[str, Path]:
    """(--dataset, host directory) for the trainer: real MNIST where it is, else a small
    synthetic set in the IDX layout."""
    if HAS_MNIST:
        return "mnist", MNIST_DIR.resolve()
    root = podman.workdir / "data"
    root.mkdir(mode=0o755)
    return "synthetic", write_dataset(root, n_train=2000, n_test=500)


def compose_project(podman: Engine, name: str, *files: Path, **env: str) -> Iterator[Compose]:
    compose_binary()
    project = Compose(podman, name, [ROOT / "docker-compose.yml", *files], {"VAE_TAG": TAG, **env})
    project("down", "--volumes", "--timeout", "5", check=False)
    try:
        yield project
    finally:
        project("down", "--volumes", "--timeout", "5", check=False)


# ---------------------------------------------------------------------------- helpers


def digit_png() -> bytes:
    if HAS_MNIST:
        from trainer import data

        return png(data.load_split(MNIST_DIR, "test").images[0])
    return encoded(drawn_digit())


def wait_ready(url: str, timeout: float = 120) -> float:
    start = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        assert time.monotonic() - start < timeout, f"{url} not ready after {timeout:.0f} s"
        time.sleep(0.1)


def assert_hardened(podman: Engine, container: str) -> None:
    """The compose file's hardening, seen from inside: the image's user, a read-only root file
    system (the store directory belongs to that user: only the read-only mount stops a write),
    no effective capabilities."""
    assert podman("exec", container, "id", "-u").stdout.strip() == UID
    written = podman("exec", container, "touch", "/app/model_store/x", check=False)
    assert written.returncode != 0, "root fs writable"
    capabilities = podman("exec", container, "grep", "CapEff", "/proc/1/status").stdout.split()[-1]
    assert int(capabilities, 16) == 0, f"capabilities left: {capabilities}"


def served_versions(url: str) -> dict[str, str]:
    models = httpx.get(f"{url}/models", timeout=10).json()["models"]
    return {m["name"]: m["version"] for m in models}


class Load(BackgroundClients):
    """Clients sending small /sample requests back to back until stopped; each outcome kept."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.statuses: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.errors: list[str] = []
        super().__init__(clients)

    def client(self, number: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            seed = number * 1_000_000
            while not self.stopping.is_set():
                seed += 1
                try:
                    answer = http.post("/sample", json={"n": 4, "seed": seed, "model": "mnist"})
                except httpx.HTTPError as exc:
                    self.statuses["error"] += 1
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                self.statuses[str(answer.status_code)] += 1
                if answer.status_code == 200:
                    self.versions[answer.json()["version"]] += 1
                else:
                    self.errors.append(f"{answer.status_code}: {answer.text[:200]}")

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def failures(self) -> int:
        return self.requests - self.statuses["200"]

    def wait_for(self, requests: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.requests < requests:
            assert time.monotonic() < deadline, f"only {self.requests} requests in {timeout:.0f} s"
            time.sleep(0.05)


# ---------------------------------------------------------------------------- 1. build


def test_the_images_build_and_hold_only_what_they_should(podman: Engine, images: dict[str, Built]) -> None:
    def inside(image: str, *argv: str) -> str:
        return podman("run", "--rm", "--network", "none", "--entrypoint", argv[0], image, *argv[1:]).stdout

    find = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))"
    assert inside(API, "python", "-c", find, *NOT_IN_API).split() == [], (
        "the serving image holds dev or train packages"
    )
    needed = ["matplotlib", "tqdm", "torch", "service", "trainer"]
    assert inside(TRAINER, "python", "-c", find, *needed).split() == needed
    found = inside(API, "sh", "-c", f"for c in {' '.join(COMPILERS)}; do command -v $c; done; true")
    assert found.strip() == "", f"compilers in the serving image: {found.split()}"
    for image in (API, TRAINER):
        assert inside(image, "id", "-u").strip() == UID
    assert "Usage" in inside(TRAINER, "vae-train", "--help")
    for name, b in images.items():
        print(f"{name}: {b.image} {b.size / 1e9:.2f} GB, built in {b.seconds:.0f} s")


# ---------------------------------------------------------------------------- 2. run


def test_the_api_image_serves_every_endpoint_hardened(podman: Engine, images: dict[str, Built]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = "vae-test-api"
    podman("rm", "--force", name, check=False)
    # The compose file's hardening and limits, as `docker run` options.
    started = time.monotonic()
    podman("run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--cpus", "2", "--memory", "2g",
           "--publish", f"127.0.0.1:{port}:8000", API)  # fmt: skip
    try:
        ready = wait_ready(url)
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/readyz").json()["status"] == "ready"
            sample = http.post("/sample", json={"n": 4, "seed": 3})
            assert sample.status_code == 200 and len(sample.json()["images"]) == 4
            image = b64(digit_png())
            encoded = http.post("/encode", json={"images": [image]}).json()
            assert len(encoded["mu"][0]) == len(encoded["sigma"][0]) == 32
            rebuilt = http.post("/reconstruct", json={"images": [image]})
            assert rebuilt.status_code == 200 and len(rebuilt.json()["images"]) == 1
            metrics = http.get("/metrics")
            assert metrics.status_code == 200 and "vae_http_requests_total" in metrics.text
            page = http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        healthy_after = podman.check_health(name)
        assert podman.health(name) == "healthy"
        assert_hardened(podman, name)
        stopping = time.monotonic()
        podman("stop", "--time", "40", name)
        stopped = time.monotonic() - stopping
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        logs = podman("logs", name, check=False).stderr
        podman("rm", "--force", name, check=False)
    figures["api_container"] = {
        "start_to_ready_seconds": round(ready, 2),
        "healthcheck_passed_after_seconds": round(healthy_after, 2),
        "stop_seconds": round(stopped, 2),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    save_figures()
    assert "Traceback" not in logs, logs[-3000:]


# ---------------------------------------------------------------------------- 3. compose


@pytest.fixture
def compose(podman: Engine, images: dict[str, Built], dataset: tuple[str, Path]) -> Iterator[Compose]:
    # Longer shutdown requests than the default queue admits (the down test below).
    override = podman.workdir / "queue.override.yml"
    override.write_text('services:\n  api:\n    environment:\n      VAE_QUEUE_MAX: "65536"\n')
    yield from compose_project(
        podman,
        "vaetest",
        override,
        VAE_HTTP_PORT=str(free_port()),
        MNIST_DIR=str(dataset[1]),
        VAE_TRAIN_CPUS="2",
    )


def test_compose_up_train_reload_down_and_up_again(compose: Compose, podman: Engine,
                                                   dataset: tuple[str, Path]) -> None:  # fmt: skip
    url = f"http://127.0.0.1:{compose.env['VAE_HTTP_PORT']}"
    started = time.monotonic()
    compose("up", "--detach", "--no-build", "api")
    (api,) = compose.containers("api")
    ready = wait_ready(url)
    podman.check_health(api)
    assert [c["Health"] for c in compose.ps() if c["Service"] == "api"] == ["healthy"]
    before = served_versions(url)

    # The trainer profile writes a new version into the shared volume, as UID 10001.
    trained = time.monotonic()
    out = compose("--profile", "train", "run", "--rm", "trainer", "--name", "mnist", "--dataset", dataset[0],
                  *TINY_TRAINING, timeout=600)  # fmt: skip
    train_seconds = time.monotonic() - trained
    new = re.search(r"wrote /app/model_store/mnist/(v\d+)", out.stdout + out.stderr)
    assert new, out.stdout[-2000:] + out.stderr[-2000:]
    version = new.group(1)
    volume = podman("volume", "inspect", "--format", "{{.Mountpoint}}", "vaetest_models").stdout.strip()
    written = Path(volume) / "mnist" / version
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [written, *written.rglob("*")]}
    assert owners == {(int(UID), int(UID))}, owners
    assert served_versions(url) == before, "a new version was served before the reload"

    # SIGHUP through Compose, under a steady load: no failed request, the new version served.
    with Load(url) as load:
        load.wait_for(20)
        compose("kill", "--signal", "SIGHUP", "api")
        deadline = time.monotonic() + 60
        while served_versions(url)["mnist"] != version:
            assert time.monotonic() < deadline, "SIGHUP did not bring the new version in 60 s"
            time.sleep(0.2)
        reloaded_at = load.requests
        load.wait_for(reloaded_at + 20)
    assert load.failures == 0, load.errors[:5]
    assert load.versions[before["mnist"]] > 0 and load.versions[version] > 0, load.versions
    old = before["mnist"]
    row(
        "`docker compose kill -s SIGHUP api` (a new trained version) under a steady load of 4 clients",
        load.requests,
        f"0 failed; {load.versions[old]} answered by {old}, {load.versions[version]} by {version}",
    )

    # `compose down` while requests are in flight: every accepted request is answered.
    answers = down_with_requests_in_flight(compose, url)
    assert all(status == 200 for status, _ in answers), answers
    late = sum(1 for _, after in answers if after)
    row(
        "`docker compose down` with 8 /sample n=1024 requests accepted, most still queued",
        len(answers),
        f"all 8 answered 200 with 1024 images; {late} of them after `down` had begun",
    )

    # Up again: the volume's versions, the trained one included, are served.
    compose("up", "--detach", "--no-build", "api")
    wait_ready(url)
    assert served_versions(url)["mnist"] == version
    figures["compose"] = {
        "up_to_ready_seconds": round(ready, 2),
        "trainer_run_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    save_figures()


def down_with_requests_in_flight(compose: Compose, url: str, requests: int = 8) -> list[tuple[int, bool]]:
    """(status, answered after `down` began) for each of `requests` large /sample requests."""
    answers: list[tuple[int, float]] = []

    def client(seed: int) -> None:
        try:
            answer = httpx.post(f"{url}/sample", json={"n": 1024, "seed": seed}, timeout=120)
            ok = answer.status_code == 200 and len(answer.json()["images"]) == 1024
            answers.append((answer.status_code if ok else -answer.status_code, time.monotonic()))
        except httpx.HTTPError:
            answers.append((0, time.monotonic()))

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(requests)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while True:  # accepted = in flight (less this /metrics) or answered
        text = httpx.get(f"{url}/metrics", timeout=10).text
        in_flight = metric(text, "vae_http_requests_in_flight") - 1
        if in_flight + len(answers) >= requests:
            break
        assert time.monotonic() < deadline, f"only {in_flight + len(answers)} of {requests} accepted"
        time.sleep(0.01)
    began = time.monotonic()
    compose("down", "--timeout", "40")
    for thread in threads:
        thread.join(timeout=120)
    return [(status, at > began) for status, at in answers]


# ---------------------------------------------------------------------------- 4. scale


@pytest.fixture
def scaled(podman: Engine, images: dict[str, Built]) -> Iterator[Compose]:
    yield from compose_project(
        podman, "vaetest-scale", ROOT / "docker-compose.scale.yml", VAE_HTTP_PORT=str(free_port()),
        VAE_REPLICAS="2", VAE_CPUS="1", VAE_BALANCER_IMAGE=f"localhost/{BALANCER}",
    )  # fmt: skip


def balancer_log(podman: Engine, container: str) -> tuple[int, int]:
    """(requests, retries) from HAProxy's httplog lines of /sample requests."""
    log = podman("logs", container, check=False)
    lines = [line for line in (log.stdout + log.stderr).splitlines() if '"POST /sample' in line]
    retries = 0
    for line in lines:
        # ... status bytes - - ---- actconn/feconn/beconn/srv_conn/retries queues "request"
        counts = re.search(r" [-\w]{4} \d+/\d+/\d+/\d+/\+?(\d+) ", line)
        retries += int(counts.group(1)) if counts else 0
    return len(lines), retries


def test_replicas_behind_the_balancer_survive_a_rolling_restart_and_a_killed_replica(
    scaled: Compose, podman: Engine
) -> None:
    url = f"http://127.0.0.1:{scaled.env['VAE_HTTP_PORT']}"
    scaled("up", "--detach", "--no-build")
    replicas = scaled.containers("api")
    (lb,) = scaled.containers("lb")
    assert len(replicas) == 2
    for replica in replicas:
        podman.check_health(replica)
    wait_ready(url)

    def replica_ready(container: str) -> None:
        deadline = time.monotonic() + 120
        while podman(
            "exec", container, "python", "-m", "service.healthcheck", "--ready", check=False
        ).returncode:
            assert time.monotonic() < deadline, f"{container} not ready 120 s after its restart"
            time.sleep(0.2)

    # A rolling restart: one replica at a time, the next only once the balancer has the
    # restarted one back (HAProxy checks /readyz every second and needs one success).
    restart_started = time.monotonic()
    with Load(url) as rolling:
        rolling.wait_for(20)
        for replica in replicas:
            podman("restart", "--time", "40", replica)
            replica_ready(replica)
            time.sleep(2.5)
        rolling.wait_for(rolling.requests + 20)
    restart_seconds = time.monotonic() - restart_started
    _, rolled_retries = balancer_log(podman, lb)
    assert rolling.failures == 0, rolling.errors[:5]
    row(
        "rolling restart of 2 replicas behind HAProxy (`podman restart -t 40`, one at a time) under a "
        "steady load of 4 clients",
        rolling.requests,
        f"0 failed; {rolled_retries} retried by the balancer on the other replica; {restart_seconds:.0f} s",
    )

    # SIGKILL: no drain at all. The balancer retries what was in flight on the other replica
    # and stops sending it requests once /readyz fails twice.
    with Load(url) as killed:
        killed.wait_for(20)
        podman("kill", "--signal", "KILL", replicas[0])
        time.sleep(5)
        killed.wait_for(killed.requests + 20)
    total, retries = balancer_log(podman, lb)
    log = podman("logs", lb, check=False)
    assert re.search(r"Server replicas/api\d+ is DOWN", log.stdout + log.stderr), (
        "the balancer never saw it go"
    )
    assert killed.failures == 0, killed.errors[:5]
    row(
        "SIGKILL of 1 of 2 replicas behind HAProxy under a steady load of 4 clients",
        killed.requests,
        f"0 failed; {retries - rolled_retries} retried on the other replica; the killed one marked DOWN "
        "by its /readyz check",
    )
    figures["scale"] = {
        "replicas": 2,
        "rolling_restart_seconds": round(restart_seconds, 1),
        "balancer_requests": total,
        "balancer_retries": retries,
    }
    save_figures()


# The slow clients of bench/slow_clients.py, run inside a container on the deployment's own
# network: from this host, Podman's port forwarding shows every client to the balancer as the
# bridge's gateway, which would make the attacker and the ordinary clients one client.
ATTACK = """
import asyncio, json, socket, sys
sys.path.insert(0, "/opt/attack")
from bench.slow_clients import Report, attack
url, seconds, prefix = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
source = socket.gethostbyname(socket.gethostname())
report = asyncio.run(attack(url, [source], 200, seconds, interval=1.0, ordinary=0, prefix=prefix))
print(json.dumps({"source": source, **report.summary()}))
"""


def attack_from_a_container(podman: Engine, lb: str, seconds: float, prefix: int) -> dict[str, Any]:
    network = podman("inspect", lb, "--format", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}")
    address = podman("inspect", lb, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}")
    out = podman(
        "run", "--rm", "--network", network.stdout.split()[0],
        "--volume", f"{ROOT / 'bench'}:/opt/attack/bench:ro",
        "--env", "PYTHONDONTWRITEBYTECODE=1", "--entrypoint", "python", f"localhost/{API}", "-c", ATTACK,
        f"http://{address.stdout.split()[0]}:8080", str(seconds), str(prefix), timeout=seconds + 120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_slow_clients_through_the_balancer_leave_the_others_served(scaled: Compose, podman: Engine) -> None:
    """Issue 25 through the scale-out deployment: 200 slow-body connections from one container
    on the deployment's network for 20 s, reopened as they close, while 4 ordinary clients on
    this host send /sample. Bodies that fit HAProxy's buffer are cut by its `timeout
    http-request` (408, never reaching a replica); bodies larger than the buffer reach the
    replicas, which count the attacker by the address HAProxy names in X-Forwarded-For."""
    url = f"http://127.0.0.1:{scaled.env['VAE_HTTP_PORT']}"
    scaled("up", "--detach", "--no-build")
    wait_ready(url)
    (lb,) = scaled.containers("lb")
    results: dict[str, tuple[dict[str, Any], Report]] = {}
    for kind, prefix in (("small", 0), ("large", 20_000)):
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(attack_from_a_container, podman, lb, 20.0, prefix)
            ordinary = asyncio.run(attack(url, [], 0, 25.0, ordinary=4))
            results[kind] = (slow.result(), ordinary)
    logs = "".join(
        log.stdout + log.stderr for log in (podman("logs", c, check=False) for c in scaled.containers("api"))
    )
    figures["slow_clients"] = {
        kind: {
            **{k: v for k, v in slow.items() if not k.startswith("ordinary")},
            "ordinary_requests": len(o.ordinary),
            "ordinary_ok": o.ordinary_ok(),
        }
        for kind, (slow, o) in results.items()
    }
    save_figures()

    (small, small_ordinary), (large, large_ordinary) = results["small"], results["large"]
    for slow, ordinary in results.values():
        assert slow["slow_opened"] >= 200 and ordinary.ordinary_ok() >= 0.99, (slow, ordinary.lines(0))
        assert slow["longest_hold_s"] <= 30, slow
    assert set(small["slow_answers"]) == {"408"}, small  # the balancer's, in the service's format
    assert set(large["slow_answers"]) <= {"408", "429"} and large["slow_answers"].get("429"), large
    # The replicas saw the attacker's own address, not the balancer's.
    assert f"slow request body from {large['source']}" in logs and f"client {large['source']} has" in logs
    row(
        "slow bodies through HAProxy: 200 connections from one client sending 100,000-byte bodies a "
        "byte a second, reopened as they close, 20 s; 4 ordinary clients beside them",
        len(small_ordinary.ordinary),
        f"{small_ordinary.ordinary_ok():.2%} of ordinary requests × 200; all {small['slow_opened']} "
        f"slow ones 408 from the balancer, held ≤ {small['longest_hold_s']:.1f} s",
    )
    row(
        "the same with 20,000 bytes sent at once (more than HAProxy buffers), then a byte a second",
        len(large_ordinary.ordinary),
        f"{large_ordinary.ordinary_ok():.2%} of ordinary requests × 200; the replicas answered the slow ones "
        f"{large['slow_answers']} by the client's own address, held ≤ {large['longest_hold_s']:.1f} s",
    )


# ---------------------------------------------------------------------------- 5. kubernetes


def test_the_kubernetes_deployment_runs_with_podman_kube_play(
    podman: Engine, images: dict[str, Built]
) -> None:
    """The cpu overlay's rendered Deployment, as written but for the image (the one built
    above) and one replica. Podman plays Deployments, not Services, autoscalers or policies;
    it ignores the readiness and startup probes and turns an httpGet liveness probe into a
    `curl` health check, which the image (no curl, on purpose) cannot run: so the test asks
    the probes' paths itself."""
    docs = render("cpu")
    deployment = copy.deepcopy(one(docs, "Deployment", "vae-api"))
    deployment["spec"]["replicas"] = 1
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container["image"] = f"localhost/{API}"
    manifest = podman.workdir / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    podman("kube", "down", str(manifest), check=False)
    started = time.monotonic()
    played = podman("kube", "play", str(manifest))
    try:
        # "Pod:\n<id>\nContainer:\n<id>\n"
        lines = played.stdout.split()
        pod, name = lines[lines.index("Pod:") + 1], lines[lines.index("Container:") + 1]
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod).stdout.strip()
        address = podman("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                         infra).stdout.strip()  # fmt: skip
        assert address, "the pod has no address on Podman's network"
        url = f"http://{address}:{container['ports'][0]['containerPort']}"
        ready = wait_ready(url)
        with httpx.Client(base_url=url, timeout=30) as http:
            sample = http.post("/sample", json={"n": 2, "seed": 5})
            assert sample.status_code == 200 and len(sample.json()["images"]) == 2
            assert http.get(container["livenessProbe"]["httpGet"]["path"]).status_code == 200
        assert_hardened(podman, name)
        total = time.monotonic() - started
    finally:
        podman("kube", "down", str(manifest), check=False)
    figures["kube_play"] = {"ready_after_play_seconds": round(ready, 2), "total_seconds": round(total, 1)}
    save_figures()
