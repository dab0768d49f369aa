"""Attacks on the module: request smuggling through the module's own responses, unauthenticated
path confusion, forward_domain host confusion, sessions replayed across providers, login floods,
internal redirects into another provider's location, external_host with a path, duplicate
session cookies, and unauth patterns that would make everything public.

Each test states the security property it checks; where the exact refusal is a matter of
taste (302 to the login or 401, or nginx's own 400) any of them is accepted, but the upstream
must never be reached without a session and never with another provider's identity.

Most setups are shared per file (module-scoped fixtures, one nginx per attack class and
target); requests that must not be normalised by a client library are sent on raw sockets
(`RawConn`, `raw_request`)."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests

from harness import (CALLBACK_PATH, NAV_HEADERS, OUTPOST, XHR_HEADERS, Browser, Nginx, echo, free_port,
                     parse_set_cookie, provider_block, query_of, session_cookie_name, set_cookies)
from test_foundation import CLIENT, ISSUER, assert_emerg_at, line_of

DOMAIN = "authentik.test"


# --- raw HTTP/1.1 on a socket ------------------------------------------------------------------
class RawResponse:
    def __init__(self, status: int, reason: str, headers: list, body: bytes, raw: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw = raw

    def header(self, name: str, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def set_cookies(self):
        return [parse_set_cookie(v) for v in self.getall("Set-Cookie")]

    def echo(self):
        """The upstream echo's JSON if this is one, else None."""
        if self.status != 200:
            return None
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        if isinstance(data, dict) and "headers" in data and "method" in data:
            return data
        return None

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return f"RawResponse({self.status} {self.headers} {self.body[:300]!r})"


class RawConn:
    """One TCP connection to nginx: send bytes, read HTTP responses one by one."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.closed = False

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, timeout: float) -> bool:
        """Reads more bytes; False on timeout or when the peer closed (see self.closed)."""
        if self.closed:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            self.closed = True
            return False
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def _need(self, n: int, deadline: float):
        while len(self.buf) < n:
            if not self._fill(deadline - time.monotonic()):
                raise AssertionError(f"response truncated (wanted {n} bytes, have {len(self.buf)}): "
                                     f"{self.buf[:2000]!r}")

    def response(self, timeout: float = 15.0, head: bool = False) -> RawResponse:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline - time.monotonic()):
                raise AssertionError(f"no complete response header (closed={self.closed}): {self.buf[:2000]!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        head_bytes = self.buf[:end]
        lines = head_bytes[:-4].decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
        assert m, f"not an HTTP response: {self.buf[:500]!r}"
        status = int(m.group(1))
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        self.buf = self.buf[end:]
        hdr = {k.lower(): v for k, v in headers}
        body = b""
        if head or status in (204, 304) or 100 <= status < 200:
            pass
        elif "chunked" in hdr.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill(deadline - time.monotonic()):
                        raise AssertionError(f"chunked body truncated: {self.buf[:500]!r}")
                line, _, rest = self.buf.partition(b"\r\n")
                size = int(line.split(b";")[0].strip(), 16)
                self.buf = rest
                self._need(size + 2, deadline)
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
        elif "content-length" in hdr:
            n = int(hdr["content-length"])
            self._need(n, deadline)
            body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill(deadline - time.monotonic()):
                pass
            body, self.buf = self.buf, b""
        return RawResponse(status, m.group(2), headers, body, head_bytes + body)

    def idle(self, wait: float) -> bytes:
        """Whatever else arrives within `wait` seconds (stops early when the peer closes)."""
        end = time.monotonic() + wait
        while not self.closed and time.monotonic() < end:
            self._fill(end - time.monotonic())
        return self.buf

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def build_request(method: str, target: str, host: str, headers=(), body: bytes = b"",
                  close: bool = False) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def raw_request(port: int, method: str, target: str, host: str, headers=(), timeout: float = 15.0) -> RawResponse:
    """One request on a new connection (Connection: close); the target is sent exactly as given."""
    c = RawConn(port, timeout)
    try:
        c.send(build_request(method, target, host, headers, close=True))
        return c.response(timeout)
    finally:
        c.close()


RAW_NAV = [(k, v) for k, v in NAV_HEADERS.items()]
RAW_XHR = [(k, v) for k, v in XHR_HEADERS.items()]


def identity_of(e: dict) -> list:
    """Non-empty X-authentik-* identity values an upstream echo received."""
    return [(k, v) for k, v in e["headers"]
            if k.lower().replace("_", "-").startswith("x-authentik-") and v
            and not k.lower().replace("_", "-").startswith("x-authentik-meta-")]


def username_of(e: dict):
    vals = [v for k, v in e["headers"] if k.lower().replace("_", "-") == "x-authentik-username"]
    return vals[0] if len(vals) == 1 else (vals or None)


def is_login_redirect(r: RawResponse, authorize: str, client_id: str | None = None) -> bool:
    """A 302 to the provider's authorization endpoint (for `client_id`, if given) or to an
    outpost start endpoint."""
    if r.status != 302:
        return False
    loc = r.header("Location") or ""
    if loc.startswith(authorize + "?"):
        return client_id is None or query_of(loc).get("client_id") == client_id
    return urllib.parse.urlsplit(loc).path.endswith(f"{OUTPOST}/start")


def assert_refused(r: RawResponse, navigation: bool, authorize: str, client_id: str | None = None, what=""):
    """The request did not pass: no upstream echo; a login redirect (navigation) or 401; nginx's
    own 400 (a request it rejects itself) is a refusal too."""
    e = r.echo()
    assert e is None, f"{what}: reached the upstream without a session (identity {identity_of(e)}): {e}"
    if navigation:
        ok = is_login_redirect(r, authorize, client_id) or r.status in (400, 401)
    else:
        ok = r.status in (400, 401)
    assert ok, f"{what}: expected {'a login redirect' if navigation else '401'} (or 400), got {r!r}"


# --- shared nginx per attack class -------------------------------------------------------------
def start_shared_nginx(target, tmp_path_factory, name: str, snippet_fn, worker_processes: int = 2) -> Nginx:
    """An nginx for a module-scoped fixture; `snippet_fn(nginx)` gives the config snippet
    (it may use nginx.port / nginx.prefix)."""
    n = Nginx(target, tmp_path_factory.mktemp(f"nginx-{name}-{target}"))
    n.start(snippet_fn(n), worker_processes=worker_processes)
    return n


def host_origin(nginx: Nginx, host: str) -> str:
    return f"http://{host}:{nginx.port}"


def login_cookie(browser: Browser, name: str) -> str:
    v = browser.cookie(name)
    assert v, f"no {name} cookie after login: {list(browser.cookies)} {browser.hops}"
    return v


# ============================================================================================
# 1. Request smuggling through the module's own responses (CL.0 desync)
# ============================================================================================
@pytest.fixture(scope="module")
def smuggle_env(target, provider, upstream, tmp_path_factory):
    down_client = {"client_id": "down-" + os.urandom(4).hex(), "client_secret": os.urandom(16).hex()}
    closed = free_port()  # nothing listens there: discovery fails at once
    made = {}

    def snippet(n):
        origin = n.origin
        main_client = made["client"] = provider.new_client([origin])
        return f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", provider.issuer, main_client, origin, "proxy", "unauth_paths ^/public/;")}
{provider_block("down", f"http://127.0.0.1:{closed}", down_client, origin, "proxy", "timeout 2s;")}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik main; proxy_pass {upstream.url}; }}
    location /down/ {{ auth_authentik down; proxy_pass {upstream.url}; }}
}}
"""

    n = start_shared_nginx(target, tmp_path_factory, "smuggle", snippet)
    env = SimpleNamespace()
    env.nginx, env.client, env.provider = n, made["client"], provider
    env.cookie = session_cookie_name(made["client"]["client_id"])
    yield env
    n.stop()


def _started_login(env):
    """A login started at /start: (state, Cookie header value with the binding cookie)."""
    r = requests.get(env.nginx.url(f"{OUTPOST}/start"), headers={**NAV_HEADERS, "Connection": "close"},
                     allow_redirects=False, timeout=15)
    assert r.status_code == 302, (r.status_code, r.text[:300])
    state = query_of(r.headers["Location"])["state"]
    binding = [c for c in set_cookies(r) if "_login_" in c.name and c.value]
    assert binding, [c.raw for c in set_cookies(r)]
    return state, f"{binding[0].name}={binding[0].value}"


# name -> (method, target, headers, expected status); targets may use {state}
SMUGGLE_CASES = {
    "ping": ("POST", f"{OUTPOST}/ping", [("Accept", "*/*")], 204),
    "unknown-endpoint-404": ("GET", f"{OUTPOST}/nope", RAW_NAV, 404),
    "callback-no-state-400": ("GET", f"{CALLBACK_PATH}?X-authentik-auth-callback=true&code=x", RAW_NAV, 400),
    "callback-bogus-state-400": ("GET", f"{CALLBACK_PATH}?X-authentik-auth-callback=true&state=bogus&code=x",
                                 RAW_NAV, 400),
    "legacy-callback-400": ("GET", "/any/page?X-authentik-auth-callback=true&state=bogus&code=x", RAW_NAV, 400),
    "access-denied-403": ("GET", f"{CALLBACK_PATH}?X-authentik-auth-callback=true&state={{state}}&error=access_denied",
                          RAW_NAV, 403),
    "no-session-401": ("POST", "/api/data", RAW_XHR, 401),
    "navigation-302": ("GET", "/private/page?x=1", RAW_NAV, 302),
    "start-302": ("GET", f"{OUTPOST}/start?rd=%2Fprivate", RAW_NAV, 302),
    "sign-out-302": ("GET", f"{OUTPOST}/sign_out", RAW_NAV, 302),
    "provider-down-502": ("GET", "/down/page", RAW_NAV, 502),
    "forward-nginx-config-500": ("POST", f"{OUTPOST}/auth/nginx", RAW_NAV, 500),
    "forward-nginx-401": ("POST", f"{OUTPOST}/auth/nginx", RAW_NAV + [("X-Original-URI", "/private")], 401),
    "forward-nginx-unauth-200": ("POST", f"{OUTPOST}/auth/nginx", RAW_NAV + [("X-Original-URI", "/public/x")], 200),
    "forward-outside-403": ("POST", f"{OUTPOST}/auth/nginx", RAW_NAV + [("X-Original-URL", "http://evil.test/")],
                            403),
    "forward-envoy-302": ("POST", f"{OUTPOST}/auth/envoy/private", RAW_NAV, 302),
}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("case", list(SMUGGLE_CASES))
def test_module_responses_discard_request_body(smuggle_env, case, framing):
    """A request body that is itself an HTTP request must never be read as the next request
    on the keep-alive connection: exactly one response (the module's), no request to the
    upstream for the smuggled /public/ path (an unauthenticated path: it would succeed
    visibly), and a legitimate follow-up on the same connection gets its own answer."""
    env = smuggle_env
    n = env.nginx
    method, target, headers, want = SMUGGLE_CASES[case]
    headers = list(headers)
    if "{state}" in target:
        state, cookie = _started_login(env)
        target = target.replace("{state}", urllib.parse.quote(state, safe=""))
        headers.append(("Cookie", cookie))
    host = f"127.0.0.1:{n.port}"
    tag = f"{case}-{framing}-{os.urandom(3).hex()}"
    smuggled = build_request("GET", f"/public/smuggled-{tag}", host)
    if framing == "content-length":
        body = smuggled
        headers.append(("Content-Length", str(len(body))))
    else:
        body = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
        headers.append(("Transfer-Encoding", "chunked"))
    headers.append(("Content-Type", "text/plain"))

    c = RawConn(n.port)
    try:
        c.send(build_request(method, target, host, headers, body))
        first = c.response()
        assert first.status == want, f"{case}: expected the module's {want}, got {first!r}"
        assert first.echo() is None, f"{case}: the first response is an upstream echo: {first!r}"
        keepalive = (first.header("Connection") or "").lower() != "close"
        follow_ok = False
        if keepalive:
            # the module's response kept the connection: the next response on it must be the
            # follow-up's (a smuggled request's response would come first)
            try:
                c.send(build_request("GET", f"/public/follow-{tag}", host, [("Accept", "*/*")]))
            except OSError:
                pass  # closed after all: whatever it answered before closing is read below
            nxt = c.response(timeout=10)
            e = nxt.echo()
            assert e is not None and e["path"] == f"/public/follow-{tag}", \
                f"{case}: the response after the module's {want} is not the follow-up's: {nxt!r}"
            follow_ok = True
        extra = c.idle(0.3)
        assert extra == b"", f"{case}: extra bytes on the connection after the responses: {extra[:1000]!r}"
    finally:
        c.close()
    time.sleep(0.05)
    log = n.access_log()
    assert f"/public/smuggled-{tag}" not in log, \
        f"{case}: the request body was served as a request:\n" + \
        "\n".join(line for line in log.splitlines() if tag in line)
    if follow_ok:
        assert f"/public/follow-{tag}" in log


# ============================================================================================
# 2. Unauthenticated-path confusion (proxy and forward_single)
# ============================================================================================
@pytest.fixture(scope="module")
def paths_env(target, provider, upstream, tmp_path_factory):
    clients = {}

    def snippet(n):
        blocks, servers = [], []
        for mode, host in (("proxy", f"proxy.{DOMAIN}"), ("forward_single", f"single.{DOMAIN}")):
            origin = host_origin(n, host)
            clients[mode] = provider.new_client([origin])
            blocks.append(provider_block(mode, provider.issuer, clients[mode], origin, mode,
                                         "unauth_paths ^/public/;"))
            servers.append(f"""
server {{
    listen 127.0.0.1:@PORT@;
    server_name {host};
    location / {{ auth_authentik {mode}; proxy_pass {upstream.url}; }}
}}""")
        return "authentik_session_zone zone=authentik:1m;\n" + "\n".join(blocks) + "\n".join(servers)

    n = start_shared_nginx(target, tmp_path_factory, "paths", snippet)
    env = SimpleNamespace()
    env.nginx, env.clients = n, clients
    env.authorize = provider.discovery()["authorization_endpoint"]
    yield env
    n.stop()


CONFUSED_PATHS = [
    "/private/..%2Fpublic/x",
    "/private/%2e%2e/public/x",
    "/private/%2E%2E/public/x",
    "/private/../public/x",
    "/private/./../public/x",
    "//public/x",
    "/public/..;/private/x",
    "/public/x;/../../private",
    "/private\\..\\public/x",
    "/public/%2e%2e/private/x",
    "/public/..%2Fprivate",
    "/public/%252e%252e/private",
]
PLAIN_PUBLIC = ["/public/x", "/public/a%20b", "/public/x?y=../.."]


@pytest.mark.parametrize("path", CONFUSED_PATHS + PLAIN_PUBLIC)
@pytest.mark.parametrize("mode", ["proxy", "forward_single"])
def test_unauth_path_confusion(paths_env, mode, path):
    """With `unauth_paths ^/public/`, a raw request path that only becomes /public/... after
    decoding, dot-segment removal or slash merging (or that a backend may read as another path:
    `;`, `\\`, double encoding) is not exempt; plain /public/ paths still are, and reach the
    upstream as sent."""
    env = paths_env
    host = f"{'proxy' if mode == 'proxy' else 'single'}.{DOMAIN}:{env.nginx.port}"
    cid = env.clients[mode]["client_id"]
    if path in PLAIN_PUBLIC:
        for headers in (RAW_NAV, RAW_XHR):
            r = raw_request(env.nginx.port, "GET", path, host, headers)
            e = r.echo()
            assert e is not None, f"{path}: a plain unauthenticated path was refused: {r!r}"
            assert e["raw_path"] == path, e
            assert identity_of(e) == [], e
        return
    for headers, nav in ((RAW_NAV, True), (RAW_XHR, False)):
        r = raw_request(env.nginx.port, "GET", path, host, headers)
        assert_refused(r, nav, env.authorize, cid, f"{mode} {path} ({'navigation' if nav else 'xhr'})")


# ============================================================================================
# 3. forward_domain: unauth URL matching must use the host nginx routed on
# ============================================================================================
@pytest.fixture(scope="module")
def domain_env(target, provider, upstream, tmp_path_factory):
    env = SimpleNamespace()

    def snippet(n):
        auth = host_origin(n, f"auth.{DOMAIN}")
        env.client = provider.new_client([auth])
        extra = (f"cookie_domain {DOMAIN};\n"
                 r"unauth_paths ^https?://status\.authentik\.test(:[0-9]+)?/ "
                 r"^https?://app2\.authentik\.test(:[0-9]+)?/public/;")
        return f"""
authentik_session_zone zone=authentik:1m;
{provider_block("domain", provider.issuer, env.client, auth, "forward_domain", extra)}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{
        auth_authentik domain;
        proxy_set_header X-Seen-Host $host;
        proxy_pass {upstream.url};
    }}
}}
"""

    env.nginx = start_shared_nginx(target, tmp_path_factory, "domain", snippet)
    env.authorize = provider.discovery()["authorization_endpoint"]
    yield env
    env.nginx.stop()


# (request target, Host header host) ; PORT is replaced
DOMAIN_REFUSED = {
    "absolute-form-app1": ("http://app1.authentik.test:PORT/secret", "status"),
    "absolute-form-app1-https": ("https://app1.authentik.test:PORT/secret", "status"),
    "absolute-form-app1-no-port": ("http://app1.authentik.test/secret", "status"),
    "absolute-form-app2-dotdot": ("http://app2.authentik.test:PORT/public/../secret", "status"),
    "status-dot-segment": ("/a/../secret", "status"),
    "status-encoded-slash": ("/a%2F..%2Fsecret", "status"),
    "app2-public-dotdot": ("/public/../secret", "app2"),
    "app2-public-encoded-dots": ("/public/%2e%2e/secret", "app2"),
    "app2-public-encoded-slash": ("/public/..%2Fsecret", "app2"),
}
DOMAIN_PASSES = {
    "status-plain": ("/x", "status"),
    "status-query": ("/x?y=1", "status"),
    "app2-public": ("/public/x", "app2"),
}


@pytest.mark.parametrize("case", list(DOMAIN_REFUSED) + list(DOMAIN_PASSES))
def test_forward_domain_unauth_host_confusion(domain_env, case):
    """forward_domain matches unauth patterns against scheme://host/path: the host must be the
    one nginx routes on (the absolute-form request line wins over Host), and the path must be
    unambiguous; `GET /x` on the public status host still passes."""
    env = domain_env
    port = env.nginx.port
    passes = case in DOMAIN_PASSES
    target, host = (DOMAIN_PASSES if passes else DOMAIN_REFUSED)[case]
    target = target.replace("PORT", str(port))
    host = f"{host}.{DOMAIN}:{port}"
    if passes:
        r = raw_request(port, "GET", target, host, RAW_NAV)
        e = r.echo()
        assert e is not None, f"{case}: a public URL was refused: {r!r}"
        assert identity_of(e) == [], e
        seen = [v for k, v in e["headers"] if k.lower() == "x-seen-host"]
        assert seen == [host.split(":")[0]], e
        return
    for headers, nav in ((RAW_NAV, True), (RAW_XHR, False)):
        r = raw_request(port, "GET", target, host, headers)
        e = r.echo()
        seen = e and [v for k, v in e["headers"] if k.lower() == "x-seen-host"]
        assert e is None, f"{case}: passed without a session (nginx routed it as {seen}): {e}"
        assert_refused(r, nav, env.authorize, env.client["client_id"], case)


# ============================================================================================
# 4. Sessions replayed across providers
# ============================================================================================
@pytest.fixture(scope="module")
def cross_env(target, provider, upstream, tmp_path_factory):
    env = SimpleNamespace()
    env.clients = {}

    def snippet(n):
        blocks, servers = [], []
        for name, mode in (("a", "proxy"), ("b", "proxy"), ("c", "forward_single")):
            origin = host_origin(n, f"{name}.{DOMAIN}")
            env.clients[name] = provider.new_client([origin])
            blocks.append(provider_block(name, provider.issuer, env.clients[name], origin, mode))
        b_loc = f"location /b-loc/ {{ auth_authentik b; proxy_pass {upstream.url}; }}"
        for name in ("a", "b", "c"):
            servers.append(f"""
server {{
    listen 127.0.0.1:@PORT@;
    server_name {name}.{DOMAIN};
    location / {{ auth_authentik {name}; proxy_pass {upstream.url}; }}
    {b_loc if name == 'a' else ''}
}}""")
        return "authentik_session_zone zone=authentik:1m;\n" + "\n".join(blocks) + "\n".join(servers)

    env.nginx = start_shared_nginx(target, tmp_path_factory, "cross", snippet)
    env.authorize = provider.discovery()["authorization_endpoint"]
    env.names = {k: session_cookie_name(c["client_id"]) for k, c in env.clients.items()}
    b = Browser()
    r = b.login(host_origin(env.nginx, f"a.{DOMAIN}") + "/", "alice")
    assert echo(r).get("X-authentik-username") == "alice", b.hops
    env.value_a = login_cookie(b, env.names["a"])
    b.close()
    yield env
    env.nginx.stop()


# case -> (server, path, cookie names carrying A's value, navigation)
CROSS_CASES = {
    "b-navigation": ("b", "/x", ["b"], True),
    "b-xhr": ("b", "/api", ["b"], False),
    "b-both-cookies": ("b", "/x", ["a", "b"], True),
    "b-both-cookies-xhr": ("b", "/api", ["a", "b"], False),
    "b-only-a-name": ("b", "/x", ["a"], True),
    "b-location-on-a-host": ("a", "/b-loc/x", ["b"], True),
    "b-location-on-a-host-xhr": ("a", "/b-loc/x", ["a", "b"], False),
    "c-forward-single": ("c", "/x", ["c"], True),
    "c-forward-single-xhr": ("c", "/api", ["c"], False),
}


@pytest.mark.parametrize("case", list(CROSS_CASES))
def test_session_not_valid_for_other_provider(cross_env, case):
    """Two providers (different client_id) share one session zone: a session created by
    provider A's login, sent under provider B's cookie name, does not authenticate at B."""
    env = cross_env
    port = env.nginx.port
    # control: A's session works at A
    r = raw_request(port, "GET", "/ctl", f"a.{DOMAIN}:{port}",
                    RAW_XHR + [("Cookie", f"{env.names['a']}={env.value_a}")])
    assert r.echo() and username_of(r.echo()) == "alice", r
    server, path, names, nav = CROSS_CASES[case]
    provider_of_path = "b" if path.startswith("/b-loc/") else server
    cookie = "; ".join(f"{env.names[x]}={env.value_a}" for x in names)
    r = raw_request(port, "GET", path, f"{server}.{DOMAIN}:{port}",
                    (RAW_NAV if nav else RAW_XHR) + [("Cookie", cookie)])
    e = r.echo()
    assert e is None, f"{case}: provider A's session authenticated at provider {provider_of_path}: " \
                      f"{identity_of(e)}"
    assert_refused(r, nav, env.authorize, env.clients[provider_of_path]["client_id"], case)


# ============================================================================================
# 5. Login floods and the return-URL cap
# ============================================================================================
def _flood(port: int, host: str, targets_fn, total: int, headers, conns: int = 6, batch: int = 50) -> dict:
    """`total` requests (targets from targets_fn(i)), pipelined `batch` at a time on `conns`
    keep-alive connections in parallel; returns {status: count}."""
    counts = {}
    lock = threading.Lock()
    per = total // conns

    def worker(w):
        local = {}
        c = None
        done = 0
        while done < per:
            if c is None or c.closed:
                if c is not None:
                    c.close()
                c = RawConn(port, timeout=20)
            k = min(batch, per - done)
            c.send(b"".join(build_request("GET", targets_fn(w * per + done + i), host, headers)
                            for i in range(k)))
            for _ in range(k):
                try:
                    st = c.response(timeout=20).status
                except AssertionError:
                    st = "closed"
                local[st] = local.get(st, 0) + 1
                done += 1
                if st == "closed":
                    break
        c.close()
        with lock:
            for key, v in local.items():
                counts[key] = counts.get(key, 0) + v

    with ThreadPoolExecutor(conns) as ex:
        list(ex.map(worker, range(conns)))
    return counts


@pytest.mark.parametrize("flood", ["start-8k-rd", "navigation-8k-url"])
def test_login_flood_keeps_sessions(app, flood):
    """Thousands of unauthenticated login starts with huge return URLs, in a small zone, do
    not evict a logged-in user's session."""
    app.start(zone_size="1m", server_extra="large_client_header_buffers 4 64k;")
    name = app.cookie_name
    b = Browser()
    assert echo(b.login(app.url("/"), "alice")).get("X-authentik-username") == "alice"
    value = login_cookie(b, name)
    before = requests.get(app.url("/before"), cookies={name: value}, headers=XHR_HEADERS, timeout=10)
    assert echo(before).get("X-authentik-username") == "alice"

    long_rd = urllib.parse.quote(app.url("/" + "r" * 8000), safe="")

    def start(i):
        return f"{OUTPOST}/start?rd={long_rd}&n={i}"

    def nav(i):
        return f"/{'n' * 8000}?n={i}"

    total = 3000
    host = f"127.0.0.1:{app.nginx.port}"
    t0 = time.monotonic()
    if flood == "start-8k-rd":
        counts = _flood(app.nginx.port, host, start, total, RAW_NAV)
    else:
        counts = _flood(app.nginx.port, host, nav, total, RAW_NAV)
    took = time.monotonic() - t0
    assert 500 not in counts, counts
    assert sum(v for k, v in counts.items() if isinstance(k, int)) >= total * 0.9, counts
    after = requests.get(app.url("/after"), cookies={name: value}, headers=XHR_HEADERS, timeout=10)
    assert after.status_code == 200, \
        f"alice's session did not survive {counts} login starts in {took:.1f}s: {after.status_code}"
    assert echo(after).get("X-authentik-username") == "alice"


@pytest.mark.parametrize("size,honoured", [(1000, True), (3000, False)], ids=["1k-honoured", "3k-capped"])
def test_return_url_length_cap(app, size, honoured):
    """A post-login return URL is kept up to 2 KB: `rd` of 1 KB is where the user lands, one of
    3 KB lands on the external host's root."""
    app.start()
    rd = app.url("/long/" + "x" * size + "?q=1")
    b = Browser()
    r = b.login(app.url(f"{OUTPOST}/start?rd=" + urllib.parse.quote(rd, safe="")), "alice")
    assert echo(r).get("X-authentik-username") == "alice", b.hops
    if honoured:
        assert r.url == rd, [h.url[:120] for h in b.hops]
    else:
        assert r.url == app.url("/"), f"landed on {r.url[:200]}... ({len(r.url)} bytes)"


# ============================================================================================
# 6. Internal redirects into another provider's location
# ============================================================================================
@pytest.fixture(scope="module")
def redirect_env(target, provider, upstream, tmp_path_factory):
    env = SimpleNamespace()

    def snippet(n):
        origin = n.origin
        env.a = provider.new_client([origin])
        env.b = provider.new_client([origin])
        empty = n.prefix / "empty"
        empty.mkdir(exist_ok=True)
        up = upstream.url
        return f"""
authentik_session_zone zone=authentik:1m;
{provider_block("A", provider.issuer, env.a, origin, "proxy")}
{provider_block("B", provider.issuer, env.b, origin, "proxy")}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik A; proxy_pass {up}; }}
    location /b/ {{ auth_authentik B; proxy_pass {up}; }}
    location @b {{ auth_authentik B; proxy_pass {up}; }}
    location @a {{ auth_authentik A; proxy_pass {up}; }}
    location /a/try-named/ {{ auth_authentik A; root {empty}; try_files /nonexistent @b; }}
    location /a/try-uri/ {{ auth_authentik A; root {empty}; try_files /nonexistent /b/from-try-files; }}
    location /a/error-named/ {{ auth_authentik A; root {empty}; error_page 404 = @b; }}
    location /a/error-uri/ {{ auth_authentik A; root {empty}; error_page 404 = /b/from-error-page; }}
    location /a/rewrite/ {{ auth_authentik A; rewrite ^ /b/from-rewrite last; }}
    location /a/same/ {{ auth_authentik A; root {empty}; try_files /nonexistent @a; }}
}}
"""

    env.nginx = start_shared_nginx(target, tmp_path_factory, "redirect", snippet)
    env.authorize = provider.discovery()["authorization_endpoint"]
    env.name_a = session_cookie_name(env.a["client_id"])
    b = Browser()
    assert echo(b.login(env.nginx.url("/"), "alice")).get("X-authentik-username") == "alice", b.hops
    env.value_a = login_cookie(b, env.name_a)
    b.close()
    yield env
    env.nginx.stop()


@pytest.mark.parametrize("path", ["/a/try-named/x", "/a/try-uri/x", "/a/error-named/x", "/a/error-uri/x",
                                  "/a/rewrite/x", "/a/same/x"],
                         ids=["try_files-named", "try_files-uri", "error_page-named", "error_page-uri",
                              "rewrite-last", "same-provider-control"])
def test_internal_redirect_rechecks_provider(redirect_env, path):
    """Logged in to provider A only: a request that A authenticates and that nginx then
    redirects internally (try_files, error_page, named location, rewrite ... last) into a
    location of provider B must get B's login or 401, never B's upstream with A's identity.
    (Control: an internal redirect into another location of A keeps A's identity.)"""
    env = redirect_env
    port = env.nginx.port
    host = f"127.0.0.1:{port}"
    cookie = ("Cookie", f"{env.name_a}={env.value_a}")
    ctl = raw_request(port, "GET", "/ctl", host, RAW_XHR + [cookie])
    assert ctl.echo() and username_of(ctl.echo()) == "alice", ctl
    if path.startswith("/a/same/"):
        r = raw_request(port, "GET", path, host, RAW_XHR + [cookie])
        assert r.echo() and username_of(r.echo()) == "alice", r
        return
    for headers, nav in ((RAW_NAV, True), (RAW_XHR, False)):
        r = raw_request(port, "GET", path, host, headers + [cookie])
        e = r.echo()
        assert e is None, f"{path}: reached provider B's upstream as {username_of(e)!r} ({identity_of(e)})"
        assert_refused(r, nav, env.authorize, env.b["client_id"], path)


# ============================================================================================
# 7. external_host with a path
# ============================================================================================
@pytest.fixture(scope="module")
def prefix_env(target, provider, upstream, tmp_path_factory):
    env = SimpleNamespace()
    env.clients = {}

    def snippet(n):
        blocks, servers = [], []
        for mode, host in (("proxy", f"app.{DOMAIN}"), ("forward_single", f"single.{DOMAIN}")):
            ext = host_origin(n, host) + "/app"
            env.clients[mode] = provider.new_client([ext])
            blocks.append(provider_block(mode, provider.issuer, env.clients[mode], ext, mode))
            servers.append(f"""
server {{
    listen 127.0.0.1:@PORT@;
    server_name {host};
    location / {{ return 404; }}
    location /app/ {{ auth_authentik {mode}; proxy_pass {upstream.url}; }}
}}""")
        return "authentik_session_zone zone=authentik:1m;\n" + "\n".join(blocks) + "\n".join(servers)

    env.nginx = start_shared_nginx(target, tmp_path_factory, "prefix", snippet)
    yield env
    env.nginx.stop()


def cookie_path_matches(cookie_path: str, request_path: str) -> bool:
    """RFC 6265 5.1.4 path-match."""
    if not cookie_path or not cookie_path.startswith("/"):
        cookie_path = "/"
    if request_path == cookie_path:
        return True
    return request_path.startswith(cookie_path) and (cookie_path.endswith("/")
                                                     or request_path[len(cookie_path)] == "/")


@pytest.mark.parametrize("mode,path", [("proxy", "/app/page?x=1"), ("proxy", "/app/"),
                                       ("forward_single", "/app/deep/page")])
def test_external_host_with_path(prefix_env, mode, path):
    """external_host http://host:PORT/app with `location /app/`: the callback is
    /app/outpost.goauthentik.io/callback, the login binding cookie's Path covers it, and a full
    login lands on the original URL."""
    env = prefix_env
    host = f"{'app' if mode == 'proxy' else 'single'}.{DOMAIN}"
    url = host_origin(env.nginx, host) + path
    b = Browser()
    r = b.login(url, "alice")
    auth = [h for h in b.hops if h.location and "redirect_uri=" in h.location]
    assert auth, b.hops
    redirect_uri = query_of(auth[0].location)["redirect_uri"]
    cb_path = urllib.parse.urlsplit(redirect_uri).path
    assert cb_path == f"/app{CALLBACK_PATH}", redirect_uri
    binding = [parse_set_cookie(v) for v in auth[0].set_cookie if "_login_" in v.split("=", 1)[0]]
    assert binding, auth[0].set_cookie
    assert cookie_path_matches(binding[0].attr("path", "/"), cb_path), \
        f"login cookie {binding[0].raw!r} is not sent to {cb_path}"
    assert r.status_code == 200 and r.url == url, f"{r.status_code} {r.text[:300]} hops: {b.hops}"
    assert echo(r).get("X-authentik-username") == "alice"
    r = b.get(host_origin(env.nginx, host) + "/app/again", follow=False)
    assert echo(r).get("X-authentik-username") == "alice"


# ============================================================================================
# 8. Duplicate session cookies
# ============================================================================================
@pytest.fixture(scope="module")
def dup_env(target, provider, upstream, tmp_path_factory):
    env = SimpleNamespace()

    def snippet(n):
        origin = host_origin(n, f"dup.{DOMAIN}")
        env.client = provider.new_client([origin])
        return f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", provider.issuer, env.client, origin, "proxy")}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik main; proxy_pass {upstream.url}; }}
}}
"""

    env.nginx = start_shared_nginx(target, tmp_path_factory, "dup", snippet)
    env.name = session_cookie_name(env.client["client_id"])
    env.host = f"dup.{DOMAIN}:{env.nginx.port}"
    b = Browser()
    assert echo(b.login(f"http://{env.host}/", "alice")).get("X-authentik-username") == "alice", b.hops
    env.value = login_cookie(b, env.name)
    b.close()
    yield env
    env.nginx.stop()


UNKNOWN_ID = "A" * 43  # well-formed, not a session

# case -> list of Cookie header values; VALID / N are replaced
DUP_CASES = {
    "garbage-first": ["N=garbage; N=VALID"],
    "unknown-id-first": [f"N={UNKNOWN_ID}; N=VALID"],
    "empty-first": ["N=; N=VALID"],
    "valid-first": ["N=VALID; N=garbage"],
    "two-headers-stale-first": ["N=garbage", "N=VALID"],
    "two-headers-valid-first": ["theme=dark; N=VALID", f"N={UNKNOWN_ID}"],
    "three-copies": [f"N=stale1; theme=dark; N={UNKNOWN_ID}; N=VALID"],
}


def _expires_now(c) -> bool:
    if c.attr("max-age") is not None:
        try:
            return int(c.attr("max-age")) <= 0
        except ValueError:
            return False
    exp = c.attr("expires")
    if exp:
        from email.utils import parsedate_to_datetime
        try:
            return parsedate_to_datetime(exp).timestamp() <= time.time()
        except (TypeError, ValueError):
            return False
    return False


@pytest.mark.parametrize("case", list(DUP_CASES))
def test_duplicate_session_cookies(dup_env, case):
    """A browser may carry stale copies of the session cookie from other scopes (authentik's
    own outpost sets Domain=): with the valid one anywhere among them the request is
    authenticated, the host-only valid cookie is not expired, and the session keeps working."""
    env = dup_env
    port = env.nginx.port
    cookies = [v.replace("VALID", env.value).replace("N=", env.name + "=") for v in DUP_CASES[case]]
    for headers, nav in ((RAW_NAV, True), (RAW_XHR, False)):
        r = raw_request(port, "GET", "/dup", env.host, headers + [("Cookie", v) for v in cookies])
        e = r.echo()
        assert e is not None, f"{case}: a request carrying the valid session was not authenticated: {r!r}"
        assert username_of(e) == "alice", e
        leaked = [v for k, v in e["headers"] if k.lower() == "cookie" and env.value in v]
        assert not leaked, f"{case}: the session cookie reached the upstream: {leaked}"
        expiring = [c for c in r.set_cookies() if c.name == env.name and _expires_now(c)]
        for c in expiring:
            assert c.has("domain"), \
                f"{case}: the authenticated response expires the host-only session cookie: {c.raw}"
        # every case carries a stale copy: it is expired in the Domain= scopes it may live in
        assert expiring, f"{case}: the stale copy is not expired: {r.getall('Set-Cookie')}"
    again = raw_request(port, "GET", "/again", env.host, RAW_XHR + [("Cookie", f"{env.name}={env.value}")])
    assert again.echo() and username_of(again.echo()) == "alice", again


# ============================================================================================
# 9. Unauth patterns that make everything public
# ============================================================================================
def _unauth_conf(where: str, pattern: str) -> str:
    provider_extra = f"unauth_paths ^/ok/ {pattern};" if where == "provider" else ""
    server = f"authentik_unauth_paths ^/ok/ {pattern};" if where == "server" else ""
    loc = f"authentik_unauth_paths {pattern};" if where == "location" else ""
    return f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", ISSUER, CLIENT, "http://127.0.0.1:@PORT@", "proxy", provider_extra)}
server {{
    listen 127.0.0.1:@PORT@;
    {server}
    location / {{ auth_authentik main; return 200 "ok"; }}
    location /loc/ {{
        auth_authentik main;
        {loc}
        return 200 "loc";
    }}
}}
"""


BROAD = ["^", ".*", "a|", "(?:)", "^/", "/"]
NARROW = [r"^/public/", r"\.css$"]


@pytest.mark.parametrize("pattern", BROAD + NARROW)
@pytest.mark.parametrize("where", ["provider", "server", "location"])
def test_unauth_pattern_matching_everything_refused(nginx, where, pattern):
    """`nginx -t` fails, naming the file and line, for an unauth pattern that matches every
    path (in unauth_paths or authentik_unauth_paths); narrow patterns are accepted."""
    nginx.check_target()
    text = nginx.wrap(_unauth_conf(where, pattern))
    rc, out = nginx.test_config(text)
    if pattern in NARROW:
        assert rc == 0, out
        return
    needle = {"provider": "unauth_paths ^/ok/", "server": "authentik_unauth_paths ^/ok/",
              "location": f"authentik_unauth_paths {pattern};"}[where]
    assert_emerg_at(nginx, rc, out, line_of(text, needle), f"{where} pattern {pattern!r}")


# HTTP/2: the module's responses discard the stream's body too, and the connection keeps
# serving other streams.
def h2_exchange(port: int, requests_: list[tuple[str, str, list, bytes]], timeout: float = 10.0) -> list[int]:
    """Sends each (method, path, headers, body) as one stream on one h2c connection, one after
    the other; returns the status of each (None when the stream got no answer)."""
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    statuses = []
    try:
        for method, path, headers, body in requests_:
            sid = conn.get_next_available_stream_id()
            hdrs = [(":method", method), (":path", path), (":scheme", "http"),
                    (":authority", f"127.0.0.1:{port}"), *[(k.lower(), v) for k, v in headers]]
            if body:
                hdrs.append(("content-length", str(len(body))))
            conn.send_headers(sid, hdrs, end_stream=not body)
            sock.sendall(conn.data_to_send())
            pending, status, ended = body, None, False
            deadline = time.monotonic() + timeout
            while not ended and time.monotonic() < deadline:
                while pending and not ended:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk, pending = pending[:window], pending[window:]
                    conn.send_data(sid, chunk, end_stream=not pending)
                    sock.sendall(conn.data_to_send())
                data = sock.recv(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                        ended = True
                sock.sendall(conn.data_to_send())
            statuses.append(status)
    finally:
        sock.close()
    return statuses


@pytest.mark.parametrize("case", ["ping", "callback-bogus-state-400", "no-session-401", "navigation-302"])
def test_module_responses_discard_body_over_http2(nginx, provider, upstream, case):
    client = provider.new_client([nginx.origin])
    nginx.start(f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", provider.issuer, client, nginx.origin, "proxy", "unauth_paths ^/public/;")}
server {{
    listen 127.0.0.1:@PORT@ http2;
    location / {{ auth_authentik main; proxy_pass {upstream.url}; }}
}}
""")
    method, target, headers, status = SMUGGLE_CASES[case]
    body = b"GET /public/smuggled-h2 HTTP/1.1\r\nHost: x\r\n\r\n" * 4000
    codes = h2_exchange(nginx.port, [("POST", target, headers, body), ("GET", "/public/after-h2", [], b"")])
    assert codes == [status, 200], codes
    # nginx writes the access log line after the response: wait for it
    deadline = time.monotonic() + 5
    while "/public/after-h2" not in nginx.access_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = nginx.access_log()
    assert "smuggled-h2" not in log and "/public/after-h2" in log, log
