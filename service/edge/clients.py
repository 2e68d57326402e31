"""Who a request comes from, for the per-client limit and the log lines about slow clients.

The address is the peer's, or the one a trusted proxy named in X-Forwarded-For: vae-serve
runs uvicorn's ProxyHeadersMiddleware for VAE_FORWARDED_ALLOW_IPS in front of everything
(service.app), so scope["client"] is already that address here."""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from starlette.types import Scope

# An IPv6 client is given a /64 by its provider, so an address counts as its /64: otherwise
# one client could take every slot by using a new address per connection.
IPV6_PREFIX = 64


def client_address(scope: Scope) -> str | None:
    """The client's address as served (None over a Unix socket, where there is none)."""
    client = scope.get("client")
    return client[0] if client else None


def client_key(address: str) -> str:
    """The unit the per-client limit counts: an IPv4 address, or an IPv6 address's /64."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))


class ThrottledWarnings:
    """A warning per key (a client and a limit) at most once every `interval` seconds, with
    the count of those held back meanwhile: 200 slow sockets refused every few seconds must
    not bury the log, and the first line about each client must still appear at once."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 10_000) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[Any, list[float]] = {}  # key -> [when last logged, lines held back since]

    def warning(self, key: Any, message: str, *args: Any) -> None:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return
        held = int(seen[1]) if seen is not None else 0
        if seen is None and len(self._seen) >= self.max_keys:
            self._seen.clear()  # bounded memory whatever the number of addresses
        self._seen[key] = [now, 0]
        if held:
            message += " (and %d more like it in the last %g s, not logged)"
            args = (*args, held, self.interval)
        self.logger.warning(message, *args)
