"""Real `vae-serve` processes for the deployment tests: start one with a given command line and
environment, wait until it is ready, signal it, stop it, read its log."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import pytest

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 180.0  # generous: a loaded CI machine can take a minute to import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any VAE_* variable of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
    return {**env, **extra}


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_for_log(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.process.poll() is not None:
                pytest.fail(f"vae-serve exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} did not appear in the log within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as `docker stop` sends; the exit status, after SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"vae-serve did not stop within {timeout} s of SIGTERM:\n{self.log()}")

    def kill(self) -> None:
        """Cleanup after a failed test: nothing may outlive it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start(argv: list[str], env: dict[str, str], log_path: Path, port: int, cwd: Path | None = None) -> Served:
    with log_path.open("wb") as sink:
        # A session of its own: signals from the test go to the server alone, and kill()
        # can end it together with anything it forked.
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    return Served(process, f"http://127.0.0.1:{port}", log_path)


def wait_ready(served: Served, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if served.process.poll() is not None:
            pytest.fail(f"vae-serve exited with {served.process.returncode} while starting:\n{served.log()}")
        try:
            if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            served.kill()
            pytest.fail(f"vae-serve not ready after {timeout} s:\n{served.log()}")
        time.sleep(0.1)


def command(script: str, module: str) -> list[str]:
    """The installed console script, or the module when the package is not installed."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def launch(store: Path, log_path: Path, *options: str, env: dict[str, str] | None = None) -> Served:
    """`vae-serve` on a free port with the given store and one torch thread, just started."""
    port = free_port()
    argv = [*command("vae-serve", "service.cli"), "--port", str(port), "--model-store", str(store)]
    argv += ["--device", "cpu", "--torch-threads", "1", *options]
    return start(argv, env or clean_env(), log_path, port)


def serve(store: Path, log_path: Path, *options: str, env: dict[str, str] | None = None) -> Served:
    """launch(), then wait until it is ready to answer."""
    served = launch(store, log_path, *options, env=env)
    wait_ready(served)
    return served


def clean_exit(code: int) -> bool:
    """uvicorn finishes a graceful shutdown by re-raising SIGTERM: -SIGTERM is a clean exit
    (in the image, tini -e 143 turns it into 0)."""
    return code in (0, -signal.SIGTERM)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels`, from /metrics."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


class BackgroundClients:
    """`clients` threads, each running `client(number)` during the `with` block: the steady
    load under which a reload, a restart or a shutdown must not fail a request. A subclass's
    `client` sends requests until `self.stopping` is set."""

    def __init__(self, clients: int) -> None:
        self.stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self.client, args=(number,), daemon=True) for number in range(clients)
        ]

    def client(self, number: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=120)
