"""Bounded work while the identity provider is slow or down.

A stalled provider must tie up at most one discovery fetch per worker (single-flight), a
failed fetch is remembered for a few seconds (negative cache), calls on the thread pool are
capped per provider (`max_pending_calls`, 503 beyond), and a suspended request whose client
went away is released at once, so `worker_connections` never runs out and other providers and
locations keep working.
"""

import socket
import threading
import time
import urllib.parse

import requests

from harness import (CALLBACK_PATH, App, Browser, echo, fresh_get, provider_block)

NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


class BlackHole:
    """A TCP listener that accepts connections and never answers; counts them."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def issuer(self):
        return f"http://127.0.0.1:{self.port}/application/o/stalled/"

    def _run(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            with self.lock:
                self.accepted += 1
                self.conns.append(c)

    def count(self):
        with self.lock:
            return self.accepted

    def close(self):
        self.running = False
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


def stalled_client():
    return {"client_id": "stalled-client", "client_secret": "stalled-secret"}


def navigate_all(urls, timeout=20):
    """GETs every URL at once (one thread each); returns the status codes (None on error)."""
    results = [None] * len(urls)

    def one(i, url):
        try:
            results[i] = fresh_get(url, headers=NAV, timeout=timeout).status_code
        except requests.RequestException:
            results[i] = None

    threads = [threading.Thread(target=one, args=(i, u)) for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return results


def test_discovery_is_single_flight_with_negative_cache(nginx, upstream):
    hole = BlackHole()
    try:
        conf = f"""
authentik_session_zone zone=authentik:1m;
{provider_block("stalled", hole.issuer, stalled_client(), nginx.origin, extra="timeout 2s;")}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik stalled; proxy_pass {upstream.url}; }}
}}
"""
        nginx.start(conf, worker_processes=1)
        t0 = time.monotonic()
        codes = navigate_all([nginx.url(f"/p{i}") for i in range(60)])
        took = time.monotonic() - t0
        # one fetch for all 60 navigations: the others waited for it on the event loop
        assert hole.count() == 1, f"{hole.count()} discovery connections for 60 navigations"
        assert codes == [502] * 60, codes
        assert took < 8, f"60 navigations behind one 2 s fetch took {took:.1f}s"
        # negative cache: the next navigations are answered at once, without a new fetch
        t1 = time.monotonic()
        for i in range(5):
            r = fresh_get(nginx.url(f"/again{i}"), headers=NAV, timeout=5)
            assert r.status_code == 502
            assert "text/html" in r.headers.get("Content-Type", "")
        assert time.monotonic() - t1 < 1.5
        assert hole.count() == 1
        # after the negative cache (5 s) a new fetch is tried
        time.sleep(5.2)
        navigate_all([nginx.url("/later")], timeout=5)
        assert hole.count() == 2
    finally:
        hole.close()


def test_stalled_provider_does_not_delay_another(nginx, provider, upstream):
    """100 navigations to a stalled provider; a login at a healthy provider is not delayed."""
    hole = BlackHole()
    try:
        app = App(nginx, provider, upstream)
        client = app.new_client()
        app.client = client
        conf = f"""
authentik_session_zone zone=authentik:1m;
{provider_block("stalled", hole.issuer, stalled_client(), nginx.origin, extra="timeout 3s;")}
{provider_block("main", provider.issuer, client, nginx.origin, extra="timeout 3s;")}
server {{
    listen 127.0.0.1:@PORT@;
    location /stalled/ {{ auth_authentik stalled; proxy_pass {upstream.url}; }}
    location / {{ auth_authentik main; proxy_pass {upstream.url}; }}
}}
"""
        nginx.start(conf, worker_processes=1)
        burst = threading.Thread(target=navigate_all, args=([nginx.url(f"/stalled/{i}") for i in range(100)],))
        burst.start()
        time.sleep(0.5)
        b = Browser()
        t0 = time.monotonic()
        e = echo(b.login(app.url("/healthy")))
        took = time.monotonic() - t0
        assert e.get("X-authentik-username") == "alice"
        assert took < 2.5, f"login at the healthy provider took {took:.1f}s behind a stalled one"
        burst.join(30)
        assert hole.count() == 1
    finally:
        hole.close()


def test_pending_calls_are_capped(nginx, provider, upstream):
    """With max_pending_calls 1 and the token endpoint stalled, a second callback gets 503."""
    app = App(nginx, provider, upstream)
    app.start(provider_extra="max_pending_calls 1;\ntimeout 10s;", worker_processes=1)
    callbacks = []
    for user in ("alice", "bob"):
        b = Browser()
        r = b.start_login(app.url(f"/{user}"))
        r = b.submit_login(r, user, stop=lambda r: CALLBACK_PATH in r.headers.get("Location", ""))
        callbacks.append((b, urllib.parse.urljoin(r.url, r.headers["Location"])))
    provider.stall_token(3000, count=1)
    first = {}

    def run_first():
        b, url = callbacks[0]
        first["resp"] = b.get(url, timeout=20)

    th = threading.Thread(target=run_first)
    th.start()
    time.sleep(0.8)
    b, url = callbacks[1]
    before = len(nginx.error_log())
    r = b.get(url, follow=False, timeout=10)
    assert r.status_code == 503, (r.status_code, r.text[:200])
    assert "text/html" in r.headers.get("Content-Type", "") and "Try again" in r.text
    assert "too many calls to the identity provider" in nginx.error_log()[before:]
    th.join(20)
    e = echo(first["resp"])
    assert e.get("X-authentik-username") == "alice"
    provider.reset()


def test_client_gone_is_released(nginx, upstream):
    """Clients that leave while their login waits for a stalled provider free their connection:
    with worker_connections 32, 100 abandoned navigations leave room for other requests."""
    hole = BlackHole()
    try:
        conf = f"""
authentik_session_zone zone=authentik:1m;
{provider_block("stalled", hole.issuer, stalled_client(), nginx.origin, extra="timeout 30s;")}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik stalled; proxy_pass {upstream.url}; }}
    location /open {{ auth_authentik off; proxy_pass {upstream.url}; }}
}}
"""
        text = nginx.wrap(conf, worker_processes=1).replace("worker_connections 512;", "worker_connections 32;")
        nginx.conf_path.write_text(text)
        nginx.check_target()
        import subprocess
        from harness import wait_port
        out = open(nginx.prefix / "logs" / "stderr.log", "ab")
        nginx.proc = subprocess.Popen(nginx._cmd(nginx.conf_path), stdout=out, stderr=out,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        wait_port(nginx.port, 10, nginx.proc, "nginx")
        nginx.wait_workers(1)
        host = f"127.0.0.1:{nginx.port}"
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", nginx.port))
            s.sendall(f"GET /gone{i} HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n"
                      f"Sec-Fetch-Mode: navigate\r\n\r\n".encode())
            time.sleep(0.01)
            s.close()
        time.sleep(0.5)
        r = fresh_get(nginx.url("/open/still-served"), timeout=5)
        assert r.status_code == 200, r.status_code
        assert echo(r).path == "/open/still-served"
        assert "worker_connections are not enough" not in nginx.error_log()
    finally:
        hole.close()


def test_oversized_record_is_refused_without_evictions(nginx, provider, upstream):
    """dave's 3000 groups make a record far over max_record: a clear page and one error_log
    line; alice's session survives, nothing is evicted."""
    app = App(nginx, provider, upstream)
    app.start(zone_size="1m")
    alice = Browser()
    assert echo(app.login(alice, "/a")).get("X-authentik-username") == "alice"
    before = len(nginx.error_log())
    for i in range(3):
        dave = Browser()
        r = dave.start_login(app.url(f"/d{i}"))
        r = dave.submit_login(r, "dave", stop=lambda r: CALLBACK_PATH in r.headers.get("Location", ""))
        cb = urllib.parse.urljoin(r.url, r.headers["Location"])
        r = dave.get(cb, follow=False)
        assert r.status_code == 502, (r.status_code, r.text[:300])
        assert "text/html" in r.headers.get("Content-Type", "")
        assert "more identity data than this site can store" in r.text
        assert app.cookie_name not in dave.cookies.get_dict()
    new = nginx.error_log()[before:]
    lines = [line for line in new.splitlines() if "is larger than the limit" in line]
    assert len(lines) == 3, new[-3000:]
    assert all("[error]" in line and "while creating authentik session" in line and "client: " in line
               for line in lines), lines
    assert "evicted" not in new
    e = echo(alice.get(app.url("/a/after")))
    assert e.get("X-authentik-username") == "alice"
