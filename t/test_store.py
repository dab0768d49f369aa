"""Several nginx nodes, one set of sessions: a real redis-server (Debian's package; Valkey
speaks the same protocol) behind each node's zone (`authentik_session_zone ... store=`).

Two nginx instances (A and B) with their own prefixes, ports and zones share one store and
one provider configuration (the site's external_host is A's origin, as behind a load
balancer; the browser's cookies do not depend on the port, like a browser's)."""

import base64
import os
import re
import time

import pytest

from harness import CALLBACK_PATH, OUTPOST, XHR_HEADERS, Browser, Nginx, Redis, echo, fresh_get, provider_block


def eventually(fn, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(interval)


class Pair:
    """Nodes A and B sharing `redis`."""

    def __init__(self, target, tmp_path, provider, upstream, redis):
        self.redis = redis
        self.provider = provider
        self.upstream = upstream
        self.a = Nginx(target, tmp_path / "a")
        self.b = Nginx(target, tmp_path / "b")
        self.client = provider.new_client([self.a.origin])
        self.cookie_name = None

    def conf(self, store_extra="", zone="1m"):
        block = provider_block("main", self.provider.issuer, self.client, self.a.origin)
        return f"""
authentik_session_zone zone=authentik:{zone} store={self.redis.url}{store_extra};
{block}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik main; proxy_pass {self.upstream.url}; }}
}}
"""

    def start(self, store_extra="", worker_processes=2, main=""):
        for node in (self.a, self.b):
            node.start(self.conf(store_extra), worker_processes=worker_processes, main=main)
        return self

    def stop(self):
        self.a.stop()
        self.b.stop()


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path / "redis").start()
    yield r
    r.stop()


@pytest.fixture
def pair(target, tmp_path, provider, upstream, redis, request):
    p = Pair(target, tmp_path, provider, upstream, redis)
    yield p
    p.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for name, node in (("A", p.a), ("B", p.b)):
            print(f"--- nginx {name} error.log tail ---")
            print(node.error_log()[-4000:])


def cookie_of(browser, pair):
    from harness import session_cookie_name
    return browser.cookie(session_cookie_name(pair.client["client_id"]))


def get(node, value, pair, path="/probe", headers=None):
    from harness import session_cookie_name
    return fresh_get(node.url(path), cookies={session_cookie_name(pair.client["client_id"]): value},
                     headers=headers or XHR_HEADERS)


def user_on(node, value, pair):
    r = get(node, value, pair)
    return echo(r).get("X-authentik-username") if r.status_code == 200 else None


def garbage_id() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def test_login_on_a_is_a_session_on_b(pair, browser):
    pair.start()
    assert echo(browser.login(pair.a.url("/"), "alice")).get("X-authentik-username") == "alice"
    value = cookie_of(browser, pair)
    # B never saw this user: its zone misses, the store has the session
    assert user_on(pair.b, value, pair) == "alice"
    assert user_on(pair.b, value, pair) == "alice"
    keys = pair.redis.keys("authentik:s:*")
    assert len(keys) == 1, keys
    ttl = int(pair.redis.cli("TTL", keys[0]))
    assert 0 < ttl <= 24 * 3600
    # a garbage cookie is no session on either node
    assert get(pair.b, garbage_id(), pair).status_code == 401


def test_login_started_on_a_completes_on_b(pair, browser):
    pair.start()
    form = browser.start_login(pair.a.url("/from-a?x=1"))
    r = browser.submit_login(form, "alice", stop=lambda r: CALLBACK_PATH in r.headers["Location"])
    callback = r.headers["Location"]
    assert callback.startswith(pair.a.origin + CALLBACK_PATH), callback
    on_b = pair.b.origin + callback[len(pair.a.origin):]
    r = browser.get(on_b, follow=False)
    assert r.status_code == 302, (r.status_code, r.text[:300], pair.b.error_log()[-2000:])
    assert r.headers["Location"] == pair.a.origin + "/from-a?x=1"
    value = cookie_of(browser, pair)
    assert value
    assert user_on(pair.b, value, pair) == "alice"
    assert user_on(pair.a, value, pair) == "alice"
    # the state was used: a replay on B is refused
    assert browser.get(on_b, follow=False).status_code == 400
    assert pair.redis.keys("authentik:l:*") == []


def test_sign_out_on_b_reaches_a_within_a_second(pair, browsers):
    pair.start()
    b1, b2 = browsers(), browsers()
    b1.login(pair.a.url("/"), "alice")
    b2.login(pair.a.url("/"), "bob")
    alice, bob = cookie_of(b1, pair), cookie_of(b2, pair)
    assert user_on(pair.a, alice, pair) == "alice"
    assert user_on(pair.b, alice, pair) == "alice"  # now in B's zone too
    r = b1.get(pair.b.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302
    assert get(pair.b, alice, pair).status_code == 401
    started = time.monotonic()
    eventually(lambda: get(pair.a, alice, pair).status_code == 401, 1.0, "A refuses the signed-out session")
    print(f"revocation reached A after {time.monotonic() - started:.3f}s")
    assert user_on(pair.a, bob, pair) == "bob"
    assert user_on(pair.b, bob, pair) == "bob"
    assert len(pair.redis.keys("authentik:s:*")) == 1


def test_store_down_and_back(pair, browsers):
    pair.start()
    b1, b2 = browsers(), browsers()
    b1.login(pair.a.url("/"), "alice")
    alice = cookie_of(b1, pair)
    assert user_on(pair.b, alice, pair) == "alice"
    pair.redis.stop()
    # existing sessions keep working on both nodes
    for _ in range(3):
        assert user_on(pair.a, alice, pair) == "alice"
        assert user_on(pair.b, alice, pair) == "alice"
    # a new login works on A, node-locally
    assert echo(b2.login(pair.a.url("/"), "bob")).get("X-authentik-username") == "bob"
    bob = cookie_of(b2, pair)
    assert user_on(pair.a, bob, pair) == "bob"
    started = time.monotonic()
    assert get(pair.b, bob, pair).status_code == 401
    assert time.monotonic() - started < 5
    # one line says so (per worker and interval), never the password or a crash
    eventually(lambda: "is unreachable" in pair.a.error_log(), 5, "A logs that the store is down")
    assert pair.a.error_log().count("is unreachable") <= 4, pair.a.error_log()[-3000:]
    for node in (pair.a, pair.b):
        assert "[alert]" not in node.error_log() and "panic" not in node.error_log()
    # the store returns (empty: no persistence): A writes bob's session again, B finds it
    pair.redis.start()
    eventually(lambda: user_on(pair.b, bob, pair) == "bob", 15, "B serves the session made while the store was down")
    assert user_on(pair.b, alice, pair) == "alice"  # still in B's zone
    # and revocation works again
    r = b2.get(pair.b.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302
    eventually(lambda: get(pair.a, bob, pair).status_code == 401, 1.5, "A refuses bob after the store returned")


def test_restarted_node_keeps_its_users(pair, browser):
    pair.start()
    browser.login(pair.a.url("/"), "alice")
    value = cookie_of(browser, pair)
    pair.a.stop()  # a stop, not a reload: the zone is gone
    pair.a.start(pair.conf())
    assert user_on(pair.a, value, pair) == "alice"
    r = browser.get(pair.a.url("/again"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice", browser.hops


def test_garbage_cookies_reach_the_store_once_per_id(pair):
    pair.start(worker_processes=1)
    pair.redis.cli("CONFIG", "RESETSTAT")
    ids = [garbage_id() for _ in range(20)]
    for _ in range(3):
        for value in ids:
            assert get(pair.a, value, pair).status_code == 401
    assert pair.redis.calls("get") == len(ids)
    # malformed cookies never reach it
    for value in ["x", "a" * 42, "!" * 43, "a" * 44]:
        assert get(pair.a, value, pair).status_code == 401
    assert pair.redis.calls("get") == len(ids)


def test_password_file_and_config_errors(target, tmp_path, provider, upstream):
    redis = Redis(tmp_path / "redis", password="s3cret-" + os.urandom(4).hex()).start()
    try:
        pair = Pair(target, tmp_path, provider, upstream, redis)
        pw = tmp_path / "store.pw"
        pw.write_text(redis.password + "\n")
        pair.start(store_extra=f" store_password_file={pw} store_prefix=site1: store_timeout=300ms")
        try:
            b = Browser()
            b.login(pair.a.url("/"), "alice")
            value = cookie_of(b, pair)
            assert user_on(pair.b, value, pair) == "alice"
            assert len(redis.keys("site1:s:*")) == 1
            for node in (pair.a, pair.b):
                assert redis.password not in node.error_log()
        finally:
            pair.stop()

        def emerg(store_args):
            conf = pair.a.wrap(pair.conf().replace(f"store={redis.url}", store_args))
            rc, out = pair.a.test_config(conf)
            assert rc != 0 and "[emerg]" in out and re.search(r"\.conf:\d+", out), out
            return out

        out = emerg("store=http://127.0.0.1:1/0")
        assert "must be redis:// or rediss://" in out and ".conf:" in out, out
        out = emerg(f"store=redis://:{redis.password}@127.0.0.1:1/0")
        assert "must not contain a password" in out and redis.password not in out, out
        out = emerg(f"store={redis.url} store_password_file={tmp_path}/missing.pw")
        assert "cannot read store_password_file" in out, out
        out = emerg("store_timeout=1s")
        assert 'need "store="' in out, out
        out = emerg(f"store={redis.url} store_timeout=soon")
        assert "invalid store_timeout" in out, out
        # the wrong password: the store refuses, sessions are node-local, the password is not logged
        pw.write_text("wrong-password\n")
        pair.a.start(pair.conf(f" store_password_file={pw}"))
        b = Browser()
        assert echo(b.login(pair.a.url("/"), "alice")).get("X-authentik-username") == "alice"
        eventually(lambda: "session store" in pair.a.error_log(), 5, "A logs the store's refusal")
        assert "wrong-password" not in pair.a.error_log()
        pair.a.stop()
    finally:
        redis.stop()


def test_session_end_reaches_both_nodes_and_the_store(target, tmp_path, upstream, redis, browsers):
    """Both nodes are outposts (each has its websocket to authentik, which tells every
    connected outpost). The SESSION_END also deletes the session in the store: a node that
    never had it in its zone (B, restarted) does not get it back from there."""
    import hashlib

    from harness import Authentik
    from test_outpost import DOMAIN, OUTPOST_NAME, connected_ws, ext_host, host_url, outpost_config, wait_served

    ak = Authentik(tmp_path / "authentik", outpost_name=OUTPOST_NAME).start()
    a, b = Nginx(target, tmp_path / "a"), Nginx(target, tmp_path / "b")
    try:
        app = ak.add_provider("app", "app", ext_host(a, f"app.{DOMAIN}"))
        conf = outpost_config(ak, tmp_path, upstream, [(f"app.{DOMAIN}", "app")]).replace(
            "authentik_session_zone zone=authentik:16m;",
            f"authentik_session_zone zone=authentik:16m store={redis.url};")
        for node in (a, b):
            node.start(conf)
            wait_served(node, f"app.{DOMAIN}")
        ak.wait_websocket(lambda v: len([c for c in connected_ws(v) if c["hello_count"]]) >= 2, what="two HELLOs")

        from harness import session_cookie_name
        name = session_cookie_name(app["client_id"])

        def status(node, value):
            return fresh_get(host_url(node, f"app.{DOMAIN}", "/probe"), cookies={name: value},
                             headers=XHR_HEADERS).status_code

        a1, a2 = browsers(), browsers()
        for br in (a1, a2):
            assert echo(br.login(host_url(a, f"app.{DOMAIN}", "/"), "alice")).get("X-authentik-username") == "alice"
        c1, c2 = a1.cookie(name), a2.cookie(name)
        assert status(b, c1) == 200  # c1 is in both zones; c2 only in A's and the store
        assert len(redis.keys("authentik:s:*")) == 2
        sid1 = hashlib.sha256(a1.cookie("authentik_session").encode()).hexdigest()
        sid2 = hashlib.sha256(a2.cookie("authentik_session").encode()).hexdigest()
        for sid, value in ((sid1, c1), (sid2, c2)):
            out = ak.session_end(session_id=sid)
            assert out["ended"] == [sid] and out["notified"] >= 2, out
        eventually(lambda: status(a, c1) == 401 and status(b, c1) == 401, 1.0, "SESSION_END on both nodes")
        eventually(lambda: status(a, c2) == 401, 1.0, "SESSION_END on A")
        eventually(lambda: redis.keys("authentik:s:*") == [], 2.0, "SESSION_END deletes the sessions in the store")
        b.stop()
        b.start(conf)
        wait_served(b, f"app.{DOMAIN}")
        assert status(b, c2) == 401
    finally:
        a.stop()
        b.stop()
        ak.stop()


def test_store_expiry_reaches_every_zone(pair, browsers):
    """A record that expires in the store (here earlier than the zone's copy) leaves every
    node's zone within a second (the `expired` keyspace notification)."""
    pair.start()
    b1, b2 = browsers(), browsers()
    b1.login(pair.a.url("/"), "alice")
    b2.login(pair.a.url("/"), "bob")
    alice, bob = cookie_of(b1, pair), cookie_of(b2, pair)
    assert user_on(pair.b, alice, pair) == "alice" and user_on(pair.b, bob, pair) == "bob"
    raw = base64.urlsafe_b64decode(alice + "=")
    assert pair.redis.cli("PEXPIRE", f"authentik:s:{raw.hex()}", "1").strip() == "1"
    eventually(lambda: get(pair.a, alice, pair).status_code == 401 and get(pair.b, alice, pair).status_code == 401,
               1.0, "the expired store record leaves both zones")
    assert user_on(pair.a, bob, pair) == "bob" and user_on(pair.b, bob, pair) == "bob"


def test_stalled_store_costs_at_most_store_timeout(pair, browser):
    """A store that accepts connections but never answers (SIGSTOP): an L1 miss waits at most
    about store_timeout, and meanwhile the worker serves other requests."""
    import signal
    import threading

    pair.start(store_extra=" store_timeout=1s", worker_processes=1)
    browser.login(pair.a.url("/"), "alice")
    alice = cookie_of(browser, pair)
    os.kill(pair.redis.proc.pid, signal.SIGSTOP)
    try:
        results = {}

        def miss():
            t0 = time.monotonic()
            results["status"] = get(pair.a, garbage_id(), pair).status_code
            results["took"] = time.monotonic() - t0

        thread = threading.Thread(target=miss)
        thread.start()
        hits = [user_on(pair.a, alice, pair) for _ in range(5)]
        thread.join(10)
        assert hits == ["alice"] * 5
        assert results["status"] == 401
        assert results["took"] < 4, results  # store_timeout (1 s) plus slack, never a hang
        # the store is now known down: further misses do not wait
        t0 = time.monotonic()
        assert get(pair.a, garbage_id(), pair).status_code == 401
        assert time.monotonic() - t0 < 0.5
    finally:
        os.kill(pair.redis.proc.pid, signal.SIGCONT)


def test_rediss_verifies_the_certificate(target, tmp_path, provider, upstream):
    """rediss://: TLS with the certificate verified against the trusted roots (OpenSSL's, which
    honour SSL_CERT_FILE: nginx passes it to its workers with `env`). A store whose certificate
    is not trusted is not used: sessions are node-local and the error log says why."""
    redis = Redis(tmp_path / "redis", tls=True).start()
    pair = Pair(target, tmp_path, provider, upstream, redis)
    try:
        pair.start(main=f"env SSL_CERT_FILE={redis.ca_file};")
        b = Browser()
        b.login(pair.a.url("/"), "alice")
        alice = cookie_of(b, pair)
        assert user_on(pair.b, alice, pair) == "alice"
        assert len(redis.keys("authentik:s:*")) == 1
        pair.stop()

        redis.cli("FLUSHALL")
        pair.start()  # the system's roots only: the test CA is not trusted
        b = Browser()
        assert echo(b.login(pair.a.url("/"), "bob")).get("X-authentik-username") == "bob"
        bob = cookie_of(b, pair)
        assert user_on(pair.a, bob, pair) == "bob"
        assert get(pair.b, bob, pair).status_code == 401
        assert redis.keys("authentik:*") == []
        eventually(lambda: "certificate verify failed" in pair.a.error_log(), 5, "A logs the TLS refusal")
    finally:
        pair.stop()
        redis.stop()


def test_store_eviction_reaches_every_zone(pair, browsers):
    """The store evicts (maxmemory): the evicted sessions leave every node's zone too (the
    `evicted` keyspace notification), within a second."""
    import subprocess

    pair.start()
    b1 = browsers()
    b1.login(pair.a.url("/"), "alice")
    alice = cookie_of(b1, pair)
    assert user_on(pair.b, alice, pair) == "alice" and user_on(pair.a, alice, pair) == "alice"
    pair.redis.cli("CONFIG", "SET", "maxmemory-policy", "volatile-ttl")
    pair.redis.cli("CONFIG", "SET", "maxmemory", "1")
    try:
        # the next write makes the store evict every key with a TTL (the sessions)
        try:
            pair.redis.cli("SET", "unrelated", "x")
        except subprocess.CalledProcessError:
            pass
        assert pair.redis.keys("authentik:s:*") == []
        assert int(pair.redis.cli("INFO", "stats").split("evicted_keys:")[1].split()[0]) >= 1
        eventually(lambda: get(pair.a, alice, pair).status_code == 401 and get(pair.b, alice, pair).status_code == 401,
                   1.0, "the evicted session leaves both zones")
    finally:
        pair.redis.cli("CONFIG", "SET", "maxmemory", "0")
