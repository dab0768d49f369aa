"""Sessions in shared memory: sign-out across workers, expiry, eviction, reload,
WebSocket, a stalled provider, a provider down at start."""

import re
import threading
import time
import urllib.parse

import pytest
import websocket

from harness import (CALLBACK_PATH, OUTPOST, XHR_HEADERS, App, Browser, access_pids, echo, fresh_get,
                     is_login_form, parse_set_cookie, query_of, session_cookie_name, set_cookies)


def status_with_cookie(app, value, n=1, headers=None):
    """Status codes of n requests, each on a new connection, with the session cookie."""
    name = session_cookie_name(app.client["client_id"])
    return [fresh_get(app.url("/probe"), cookies={name: value}, headers=headers).status_code for _ in range(n)]


def test_sign_out_everywhere(app, browsers):
    app.start(worker_processes=2, listen_extra="reuseport")
    name = session_cookie_name(app.client["client_id"])
    b1, b2, b3 = browsers(), browsers(), browsers()
    assert echo(b1.login(app.url("/"), "alice")).get("X-authentik-username") == "alice"
    assert echo(b2.login(app.url("/"), "alice")).get("X-authentik-username") == "alice"
    assert echo(b3.login(app.url("/"), "bob")).get("X-authentik-username") == "bob"
    c1, c2, c3 = b1.cookie(name), b2.cookie(name), b3.cookie(name)
    assert len({c1, c2, c3}) == 3
    assert status_with_cookie(app, c2, 8) == [200] * 8
    pids_before = access_pids(app.nginx)

    r = b1.get(app.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302, (r.status_code, r.text[:300])
    disc = app.provider.discovery()
    loc = r.headers["Location"]
    assert loc.startswith(disc["end_session_endpoint"] + "?"), loc
    q = query_of(loc)
    assert q["post_logout_redirect_uri"] == app.origin + "/"
    assert q["id_token_hint"].count(".") == 2, q
    expired = [c for c in set_cookies(r) if c.name == name]
    assert expired and (expired[0].attr("max-age") == "0" or expired[0].has("expires")), [c.raw for c in set_cookies(r)]
    assert expired[0].attr("max-age") in ("0", None)

    # alice's other session is gone, on every worker; bob's is not
    assert 200 not in status_with_cookie(app, c2, 10)
    assert 200 not in status_with_cookie(app, c1, 4)
    assert status_with_cookie(app, c2, 2, headers=XHR_HEADERS) == [401, 401]
    assert status_with_cookie(app, c3, 4) == [200] * 4
    if len(app.nginx.workers()) == 2 and len(access_pids(app.nginx)) < 2:
        pytest.fail(f"all requests reached one worker ({pids_before}); the cross-worker check did not run")

    # the provider accepts the id_token_hint and sends the user back
    r = b1.get(loc, stop=lambda r: True)
    assert r.status_code == 200, b1.hops
    r = b1.submit_form(r, stop=lambda r: r.headers["Location"].startswith(app.origin))
    assert r.status_code in (302, 303) and r.headers["Location"] == app.origin + "/", (r.status_code, b1.hops)


def test_many_sessions_sign_out_keeps_other_users(app):
    """Many sessions of two users in one zone: signing one user out removes exactly that user's
    sessions (the session index and the per-user index stay consistent under deletions)."""
    app.start(worker_processes=2)
    name = session_cookie_name(app.client["client_id"])
    cookies = {"alice": [], "bob": []}
    for i in range(24):
        user = "alice" if i % 3 else "bob"
        b = Browser()
        assert echo(b.login(app.url(f"/m{i}"), user)).get("X-authentik-username") == user
        cookies[user].append((b, b.cookie(name)))
    b_alice = cookies["alice"][5][0]
    r = b_alice.get(app.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302, r.status_code
    for _, value in cookies["alice"]:
        assert status_with_cookie(app, value) == [302], "an alice session survived sign-out"
    for _, value in cookies["bob"]:
        assert status_with_cookie(app, value, 2) == [200, 200], "bob lost a session"
    # new sessions still go in and are found after the deletions
    b = Browser()
    assert echo(b.login(app.url("/again"), "alice")).get("X-authentik-username") == "alice"
    assert status_with_cookie(app, b.cookie(name), 2) == [200, 200]


def test_sign_out_custom_redirect(app):
    bye = f"{app.nginx.origin}/bye"
    app.client = app.new_client(post_logout_redirect_uris=[bye])
    app.start(provider_extra=f"post_logout_redirect {bye};")
    b = Browser()
    b.login(app.url("/"))
    r = b.get(app.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302
    assert query_of(r.headers["Location"])["post_logout_redirect_uri"] == bye


def test_sign_out_without_session(app):
    app.start()
    r = Browser().get(app.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302, r.status_code
    assert r.status_code != 500


@pytest.mark.slow
def test_session_expiry(app):
    app.client = app.new_client(token_ttl=4)
    app.start()
    name = session_cookie_name(app.client["client_id"])
    b = Browser()
    t0 = time.monotonic()
    e = echo(b.login(app.url("/"), "alice"))
    assert e.get("X-authentik-username") == "alice"
    cb = [h for h in b.hops if CALLBACK_PATH in h.url][0]
    c = [parse_set_cookie(v) for v in cb.set_cookie if v.startswith(name + "=")][0]
    assert 0 < int(c.attr("max-age")) <= 4, c.raw
    value = b.cookie(name)
    assert status_with_cookie(app, value) == [200]
    time.sleep(max(0, 5.5 - (time.monotonic() - t0)))
    r = fresh_get(app.url("/late"), cookies={name: value})
    assert r.status_code == 302, r.status_code
    assert status_with_cookie(app, value, headers=XHR_HEADERS) == [401]


def smallest_zone(nginx, app):
    for size in ("32k", "64k", "128k", "256k", "512k", "1m"):
        rc, out = nginx.test_config(nginx.wrap(app.config(zone_size=size)))
        if rc == 0:
            return size
    pytest.fail(f"no zone size up to 1m accepted: {out}")


@pytest.mark.slow
def test_full_zone_evicts_old_sessions(app):
    app.client = app.new_client()
    size = smallest_zone(app.nginx, app)
    app.start(zone_size=size)
    name = session_cookie_name(app.client["client_id"])
    b = Browser()
    values = []
    evicted_at = None
    for i in range(300):
        if b.cookie(name):
            b.cookies.clear(domain="127.0.0.1", path="/", name=name)
        r = b.login(app.url(f"/n{i}"), "alice")
        assert r.status_code != 500 and all(h.status != 500 for h in b.hops), b.hops
        assert echo(r).get("X-authentik-username") == "alice", i
        values.append(b.cookie(name))
        if evicted_at is None and "evict" in app.nginx.error_log():
            evicted_at = i
        if evicted_at is not None and i >= evicted_at + 5:
            break
    assert evicted_at is not None, f"no eviction logged after {len(values)} logins in a {size} zone"
    assert status_with_cookie(app, values[-1]) == [200]
    assert status_with_cookie(app, values[0]) == [302], "the oldest session survived a full zone"
    assert re.search(r"\[warn\].*evict", app.nginx.error_log()), "eviction not logged as a warning"


def test_reload_keeps_sessions(app):
    app.start()
    name = session_cookie_name(app.client["client_id"])
    b = Browser()
    b.login(app.url("/"), "alice")
    value = b.cookie(name)
    assert status_with_cookie(app, value) == [200]
    app.nginx.reload()
    time.sleep(0.2)
    assert status_with_cookie(app, value, 4) == [200] * 4
    e = echo(fresh_get(app.url("/after"), cookies={name: value}))
    assert e.get("X-authentik-username") == "alice"


def test_websocket(app):
    app.start()
    name = session_cookie_name(app.client["client_id"])
    b = Browser()
    b.login(app.url("/"), "alice")
    value = b.cookie(name)
    ws_url = f"ws://127.0.0.1:{app.nginx.port}/ws"
    ws = websocket.create_connection(ws_url, timeout=10, cookie=f"{name}={value}; other=1",
                                     header=["Sec-Fetch-Mode: websocket", "X-authentik-username: mallory"])
    try:
        import json
        hello = json.loads(ws.recv())
        users = [v for k, v in hello["headers"] if k.lower().replace("_", "-") == "x-authentik-username"]
        assert users == ["alice"], hello
        for i in range(3):
            ws.send(f"msg {i}")
            assert ws.recv() == f"msg {i}"
    finally:
        ws.close()
    # no session: the (non-navigation) upgrade is refused
    with pytest.raises(websocket.WebSocketBadStatusException) as ei:
        websocket.create_connection(ws_url, timeout=10, header=["Sec-Fetch-Mode: websocket"])
    assert ei.value.status_code == 401


@pytest.mark.slow
def test_stalled_provider_does_not_block_worker(app):
    stall_ms = 4000
    app.start(worker_processes=1)
    name = session_cookie_name(app.client["client_id"])
    b1 = Browser()
    b1.login(app.url("/"), "alice")
    value = b1.cookie(name)
    # a second login, stopped just before nginx's callback
    b2 = Browser()
    r = b2.start_login(app.url("/slow?x=1"))
    assert is_login_form(r)
    r = b2.submit_login(r, "bob", stop=lambda r: CALLBACK_PATH in r.headers.get("Location", ""))
    cb = urllib.parse.urljoin(r.url, r.headers["Location"])
    app.provider.stall_token(stall_ms, count=1)
    result = {}

    def callback():
        t = time.monotonic()
        try:
            result["resp"] = b2.get(cb, timeout=30)
        except Exception as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - t

    th = threading.Thread(target=callback)
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    for i in range(10):
        ts = time.monotonic()
        r = fresh_get(app.url(f"/fast{i}"), cookies={name: value}, timeout=10)
        assert r.status_code == 200
        assert time.monotonic() - ts < 1.0, f"request {i} took {time.monotonic() - ts:.2f}s"
    assert time.monotonic() - t0 < 2.5
    assert "took" not in result, "the callback finished before the stall ended?"
    th.join(20)
    assert "error" not in result, result
    assert result["took"] >= (stall_ms / 1000) - 1.0
    e = echo(result["resp"])
    assert e.get("X-authentik-username") == "bob"


def test_provider_down_at_start(nginx, make_provider, upstream):
    from harness import Provider, free_port
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    # the provider's client, made before the provider exists
    maker = Provider(nginx.prefix.parent / "unused")
    maker.issuer = issuer
    client = maker.new_client([nginx.origin], register=False)
    app = App(nginx, maker, upstream)
    rc, out = nginx.test_config(nginx.wrap(app.config(client=client)))
    assert rc == 0, out
    app.start(client=client)
    b = Browser()
    before = len(nginx.error_log())
    r = b.get(app.url("/"), follow=False)
    assert r.status_code == 502, (r.status_code, r.headers)
    assert "text/html" in r.headers.get("Content-Type", "") and r.text.strip()
    new = nginx.error_log()[before:]
    assert re.search(r"\[(error|crit|warn)\]", new), new
    # a second navigation right away is answered from the negative cache: no new fetch
    r = b.get(app.url("/again"), follow=False)
    assert r.status_code == 502, (r.status_code, r.headers)
    # the provider comes up on the configured port: once the failure is older than the
    # negative cache (5 s), login works
    p = make_provider(port=port, clients=[client])
    app.provider = p
    deadline = time.monotonic() + 8
    while b.get(app.url("/later"), follow=False).status_code == 502:
        assert time.monotonic() < deadline, "login still refused 8 s after the provider came up"
        time.sleep(0.25)
    e = echo(b.login(app.url("/later")))
    assert e.get("X-authentik-username") == "alice"
