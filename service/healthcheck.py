"""`python -m service.healthcheck`: exit 0 when the local server answers GET /healthz with 200;
with `--ready`, GET /readyz (models loaded and warmed up, not draining).

The container's HEALTHCHECK (Dockerfile, docker-compose.yml) is the first: liveness. The
second is for scripts that must wait until a replica can take traffic again, such as a
rolling restart (`docker exec CONTAINER python -m service.healthcheck --ready`). The serving image has no curl
or wget; this needs only the standard library and does not import torch, so a check costs
a few milliseconds. It finds the server the way vae-serve listens: VAE_PORT (default 8000)
on VAE_HOST, with a wildcard address (0.0.0.0, ::) reached through loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def url(path: str = "/healthz") -> str:
    host = (os.environ.get("VAE_HOST") or "").strip()
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    port = (os.environ.get("VAE_PORT") or "8000").strip()
    return f"http://{host}:{port}{path}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--ready"]):
        print("usage: python -m service.healthcheck [--ready]", file=sys.stderr)
        return 2
    target = url("/readyz" if args else "/healthz")
    try:
        with urllib.request.urlopen(target, timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, bad port
        print(f"unhealthy: GET {target} failed: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: GET {target} answered {status}", file=sys.stderr)
        return 1
    print(f"healthy: GET {target} answered 200")
    return 0


if __name__ == "__main__":
    sys.exit(main())
