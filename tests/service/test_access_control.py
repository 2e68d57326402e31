"""Access control: the API key on every route, compared in constant time; CORS; request size
limits; no endpoint reading a path a client chooses; security headers.

Routes are enumerated from the app itself, so a route added later without the key fails
here. What depends on the real HTTP server (percent-decoding of paths, chunked bodies, the
server's memory) runs against a `vae-serve` process.
"""

from __future__ import annotations

import hmac
import http.client
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from process_support import Served, serve
from service_support import InProcess, b64, make_settings, png
from starlette.routing import Mount, Route

from service.app import create_app
from service.edge.auth import served_routes
from tests.reliability import record

KEY = "correct-horse-battery-staple"
OPEN = {"/", "/static", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
GOOD_PNG = png(np.eye(28, dtype=np.uint8) * 255)


def endpoints(app: Any) -> list[tuple[str, str, str]]:
    """(route template, method, a concrete URL) for every route and method of the app."""
    found = []
    for route in served_routes(app.routes):
        if isinstance(route, Mount):
            found.append((route.path, "GET", route.path + "/js/main.js"))
        elif isinstance(route, Route):
            url = route.path.replace("{name}", "tiny-2d")
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                found.append((route.path, method, url))
    assert len(found) > 10, found  # the app's own routes, not only FastAPI's docs
    return found


@pytest.fixture(scope="module")
def keyed(tiny_store: Path) -> Iterator[InProcess]:
    served = InProcess(create_app(make_settings(tiny_store, api_key=KEY, warmup=False)))
    yield served
    served.close()


def _send(served: InProcess, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    # Every POST carries a body FastAPI would parse before any dependency: the key must be
    # checked first, so a client without it learns nothing, not even that its JSON is bad.
    body = {"content": b"{not json", "headers": {**headers, "Content-Type": "application/json"}}
    return served.request(method, url, **(body if method == "POST" else {"headers": headers}))


def test_with_a_key_every_route_but_the_open_ones_is_401(keyed: InProcess) -> None:
    routes = endpoints(keyed.app)
    documented = set(keyed.get("/openapi.json").json()["paths"])
    assert documented <= {path for path, _, _ in routes}, "every documented path is enumerated"
    wrong = {
        "none": {},
        "wrong X-API-Key": {"X-API-Key": "wrong"},
        "wrong bearer": {"Authorization": "Bearer wrong"},
        "key under another scheme": {"Authorization": f"Basic {KEY}"},
        # Every credential sent must be the key: a right one does not excuse a wrong one.
        "right X-API-Key, wrong bearer": {"X-API-Key": KEY, "Authorization": "Bearer wrong"},
        "right X-API-Key, Basic auth": {"X-API-Key": KEY, "Authorization": "Basic dXNlcjpwdw=="},
        "right bearer, wrong X-API-Key": {"Authorization": f"Bearer {KEY}", "X-API-Key": "wrong"},
    }
    closed, opened = set(), set()
    checks = 0
    for path, method, url in routes:
        for label, headers in wrong.items():
            answer = _send(keyed, method, url, headers)
            checks += 1
            if answer.status_code == 401:
                closed.add(path)
                assert answer.headers["content-type"] == "application/problem+json", (url, label)
                assert answer.headers["www-authenticate"].startswith("Bearer"), (url, label)
                assert answer.headers["x-content-type-options"] == "nosniff"
            else:
                opened.add(path)
                assert path in OPEN, f"{method} {url} answered {answer.status_code} to {label}"
    assert opened == OPEN and closed == {path for path, _, _ in routes} - OPEN
    # An unknown path is closed too: no probing for routes without the key.
    assert keyed.get("/no/such/route").status_code == 401
    # With the key, in either header form, no route answers 401.
    for _, method, url in routes:
        for headers in (
            {"X-API-Key": KEY},
            {"Authorization": f"Bearer {KEY}"},
            {"Authorization": f"bearer {KEY}"},
            {"X-API-Key": KEY, "Authorization": f"Bearer {KEY}"},
        ):
            assert _send(keyed, method, url, headers).status_code != 401, (method, url, headers)
            checks += 1
    record(
        "access control",
        f"API key set: every route of the app ({len(routes)} route/method pairs, {len(closed)} guarded) "
        "without a key, with wrong keys (also beside the right one), with the key in both header forms",
        checks,
        f"every guarded route 401 before its body is parsed; only the {len(OPEN)} open paths "
        "(probes, docs, page) answer; unknown paths 401 too",
        "test_access_control.py::test_with_a_key_every_route_but_the_open_ones_is_401",
    )


def test_keys_are_compared_with_compare_digest(keyed: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    near_misses = [
        KEY[:-1] + chr(ord(KEY[-1]) + 1),
        KEY[:-1],
        KEY + "x",
        KEY.upper(),
        " " + KEY,
        "ü" + KEY[1:],
    ]
    for candidate in near_misses:
        raw = candidate.encode("latin-1")  # header bytes as a client would send them
        for headers in ({"X-API-Key": raw}, {"Authorization": b"Bearer " + raw}):
            before = len(calls)
            assert keyed.get("/models", headers=headers).status_code == 401, candidate
            assert len(calls) > before, "the key was compared without hmac.compare_digest"
    before = len(calls)
    assert keyed.get("/models", headers={"X-API-Key": KEY}).status_code == 200
    assert len(calls) > before
    assert all(b == KEY.encode() for _, b in calls)  # always against the configured key
    record(
        "access control",
        "near-miss keys: last character changed, one shorter, one longer, case, padding, non-ASCII "
        f"({len(near_misses)} keys x 2 header forms)",
        len(near_misses) * 2,
        "all 401; every comparison through hmac.compare_digest (constant time)",
        "test_access_control.py::test_keys_are_compared_with_compare_digest",
    )


def test_without_a_key_everything_is_open_but_reload(api: InProcess) -> None:
    for path, method, url in endpoints(api.app):
        answer = _send(api, method, url, {})
        if path == "/admin/reload":
            assert answer.status_code == 403 and "VAE_API_KEY is unset" in answer.json()["detail"]
        else:
            assert answer.status_code not in (401, 403), (method, url, answer.status_code)


# ---------------------------------------------------------------------------- CORS


def _preflight(served: InProcess, origin: str) -> httpx.Response:
    return served.request(
        "OPTIONS",
        "/sample",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-api-key",
        },
    )


def test_cors_allow_list(tiny_store: Path) -> None:
    allowed, other = "http://ui.example", "http://evil.example"
    served = InProcess(
        create_app(make_settings(tiny_store, cors_origins=[allowed], api_key=KEY, warmup=False))
    )
    try:
        ok = _preflight(served, allowed)  # a preflight carries no key and must not need one
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
        assert "x-api-key" in ok.headers["access-control-allow-headers"].lower()
        refused = _preflight(served, other)
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        simple = served.get("/models", headers={"Origin": allowed, "X-API-Key": KEY})
        assert simple.headers["access-control-allow-origin"] == allowed
        foreign = served.get("/models", headers={"Origin": other, "X-API-Key": KEY})
        assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
        unauthorized = served.get("/models", headers={"Origin": allowed})  # readable by the page: 401
        assert (
            unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == allowed
        )
    finally:
        served.close()


def test_no_cors_headers_when_the_list_is_empty(api: InProcess) -> None:
    answers = [
        _preflight(api, "http://ui.example"),
        api.get("/models", headers={"Origin": "http://ui.example"}),
        api.get("/healthz", headers={"Origin": "null"}),
    ]
    for answer in answers:
        assert not [h for h in answer.headers if h.lower().startswith("access-control-")], answer.headers
    record(
        "access control",
        "CORS: allowed and foreign origin, preflight and simple requests, with and without the key; "
        "empty allow-list",
        8,
        "only the listed origin is echoed (401s included); foreign preflight 400; no CORS headers when off",
        "test_access_control.py::test_cors_allow_list",
    )


# ---------------------------------------------------------------------------- client-chosen paths

SNEAKY_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "tiny/../tiny-2d",
    "tiny/v1",
    "tiny:v1",
    "tiny:../../v1",
    "tiny/v1/model.pt",
    "file:///etc/passwd",
    "tiny\x00",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
]


def _looks_like_a_file(text: str) -> bool:
    return "root:" in text or "BaseSettings" in text or "[fonts]" in text or "PK\x03\x04" in text


def test_no_model_name_reaches_the_file_system(api: InProcess) -> None:
    attempts = 0
    for name in SNEAKY_NAMES:
        quoted = httpx.QueryParams({"model": name})
        segment = name.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C").replace("\x00", "%00")
        answers = [
            api.post("/sample", json={"n": 1, "model": name}),
            api.post(f"/sample?{quoted}", json={"n": 1}),
            api.post("/decode", json={"z": [[0.0] * 8], "model": name}),
            api.post(f"/encode?{quoted}", json={"images": [b64(GOOD_PNG)]}),
            api.post("/reconstruct", json={"images": [b64(GOOD_PNG)], "model": name}),
            api.post("/encode", files={"images": ("a.png", GOOD_PNG, "image/png")}, data={"model": name}),
            api.get(f"/sample.png?{quoted}"),
            api.get(f"/models/{segment}"),
            api.get(f"/models/{segment}/latent-map"),
        ]
        for answer in answers:
            attempts += 1
            assert answer.status_code in (404, 422), (name, answer.request.url, answer.status_code)
            assert not _looks_like_a_file(answer.text), (name, answer.request.url)
    record(
        "access control",
        f"model names as paths ({len(SNEAKY_NAMES)} names: ../, absolute, backslashes, versions with "
        "slashes, file://, NUL, encoded) in body, query, form and URL path of every endpoint taking one",
        attempts,
        "all 404 unknown-model or 422; no file read",
        "test_access_control.py::test_no_model_name_reaches_the_file_system",
    )


def test_no_image_field_is_read_as_a_path(api: InProcess) -> None:
    paths = ["/etc/passwd", "file:///etc/passwd", "../../service/settings.py", "http://127.0.0.1/x.png"]
    answers = [api.post("/encode", json={"images": [p]}) for p in paths]
    answers += [
        api.post("/reconstruct", content=p.encode(), headers={"Content-Type": "image/png"}) for p in paths
    ]
    answers += [api.post("/encode", files={"images": ("../../../etc/passwd", b"/etc/passwd", "image/png")})]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.json()["type"] == "urn:vae:problem:invalid-image"
        assert not _looks_like_a_file(answer.text)


# ---------------------------------------------------------------------------- a real server

MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("access") / "serve.log"
    served = serve(
        tiny_store,
        log,
        *("--api-key", KEY, "--models", "tiny", "--max-body-bytes", str(MAX_BODY)),
        *("--max-images", "4", "--max-samples", "16"),
    )
    yield served
    served.kill()


def _port(served: Served) -> int:
    return int(served.url.rsplit(":", 1)[1])


def _raw_get(served: Served, path: str) -> tuple[int, str]:
    """GET with the path exactly as written (httpx would normalise ../ away)."""
    connection = http.client.HTTPConnection("127.0.0.1", _port(served), timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.putheader("X-API-Key", KEY)  # with the key: only the file system guards these
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode("latin-1")
    finally:
        connection.close()


TRAVERSALS = [
    "/static/../service/settings.py",
    "/static/../../service/settings.py",
    "/static/js/../../../service/settings.py",
    "/static/%2e%2e/service/settings.py",
    "/static/%2e%2e/%2e%2e/service/settings.py",
    "/static/.%2e/.%2e/etc/passwd",
    "/static/..%2f..%2fservice%2fsettings.py",
    "/static/%252e%252e/%252e%252e/service/settings.py",
    "/static/..%252f..%252fservice%252fsettings.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/..\\..\\service\\settings.py",
    "/static/..%5c..%5cservice%5csettings.py",
    "/static/....//....//etc/passwd",
    "/static/%00../../etc/passwd",
    "/static/index.html%00.png",
    "/static/../metrics",
    "/healthz/../metrics",
    "//etc/passwd",
    "/../../etc/passwd",
]


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def reset_rss_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


@pytest.mark.slow
def test_static_files_never_leave_their_folder(server: Served) -> None:
    settings_file = (Path(__file__).resolve().parents[2] / "service" / "settings.py").as_posix()
    attempts = [*TRAVERSALS, "/static" + settings_file, "/static/" + settings_file.replace("/", "%2f")]
    for path in attempts:
        status, body = _raw_get(server, path)
        assert status in (400, 401, 404), (path, status)
        assert not _looks_like_a_file(body) and "vae_http_requests_total" not in body, path
    status, body = _raw_get(server, "/static/js/main.js")  # the folder itself still serves
    assert status == 200 and "import" in body
    record(
        "access control",
        f"path traversal on /static over HTTP: ../, %2e%2e, double-encoded, backslashes, NUL, "
        f"absolute paths ({len(attempts)} paths)",
        len(attempts),
        "all 404 (or 400/401); no file outside service/static read",
        "test_access_control.py::test_static_files_never_leave_their_folder",
    )


def _response_head(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.slow
def test_oversized_bodies_are_refused_without_being_buffered(server: Served) -> None:
    pid = server.process.pid
    head = (
        f"POST /decode HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\n"
    ).encode()
    # 1. Declared: 64 MiB announced, nothing sent. The answer must come without the body.
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        started = time.perf_counter()
        sock.sendall(head + f"Content-Length: {64 * MAX_BODY}\r\n\r\n".encode())
        answer = _response_head(sock)
        declared_seconds = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # 2. Chunked: no length; keep sending until the server answers (or up to 64 MiB).
    reset_rss_peak(pid)
    before = rss_peak_kib(pid)
    frame = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        sock.settimeout(5)
        while sent < 64 * MAX_BODY:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(frame)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading: it has answered
            sent += len(frame)
        answer = _response_head(sock)
    grown_mib = (rss_peak_kib(pid) - before) / 1024
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"application/problem+json" in answer and b"nosniff" in answer.lower()
    assert grown_mib < 16, f"the server's peak RSS grew {grown_mib:.1f} MiB for a refused body"
    # 3. Too many items: clear 422s, and the server serves on.
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as http_client:
        too_many = http_client.post("/decode", json={"z": [[0.0] * 8] * 5})
        too_large_n = http_client.post("/sample", json={"n": 17})
        too_large_n_get = http_client.get("/sample.png?n=17")
        assert http_client.post("/sample", json={"n": 2, "seed": 0}).status_code == 200
    for answer_ in (too_many, too_large_n, too_large_n_get):
        assert answer_.status_code == 422 and answer_.json()["type"] == "urn:vae:problem:too-many-items"
    assert re.search(r"at most (4|16)", too_many.json()["detail"] + too_large_n.json()["detail"])
    record(
        "access control",
        "oversized bodies over HTTP (limit 1 MiB): 64 MiB declared by Content-Length; chunked, no length; "
        "too many rows, n over the limit",
        5,
        f"413 in {declared_seconds * 1000:.0f} ms without the body; chunked 413 after "
        f"{sent / MAX_BODY:.1f} MiB sent, server peak RSS +{grown_mib:.1f} MiB; 422 too-many-items",
        "test_access_control.py::test_oversized_bodies_are_refused_without_being_buffered",
    )


@pytest.mark.slow
def test_security_headers_over_http(server: Served) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http_client:
        pages = [
            http_client.get("/"),
            http_client.get("/static/js/main.js"),
            http_client.get("/static/nope.js"),
        ]
        api = [
            http_client.get("/models", headers={"X-API-Key": KEY}),
            http_client.get("/sample.png?n=1", headers={"X-API-Key": KEY}),
            http_client.get("/models"),  # 401 from the gate
            http_client.get("/models/nope", headers={"X-API-Key": KEY}),  # 404 problem
            http_client.get("/healthz"),
        ]
    for page in pages:
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "no-referrer"
    for answer in api:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.request.url
    assert [a.status_code for a in api] == [200, 200, 401, 404, 200]
    record(
        "access control",
        "security headers over HTTP: the page, a static file, a missing one; JSON, PNG, 401, 404 answers",
        len(pages) + len(api),
        "CSP (frame-ancestors 'none'), X-Frame-Options DENY, Referrer-Policy, nosniff on the page; "
        "nosniff on every API answer",
        "test_access_control.py::test_security_headers_over_http",
    )
