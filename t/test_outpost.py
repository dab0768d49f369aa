"""nginx as an authentik outpost (`authentik_outpost`): providers from authentik's outpost API,
the websocket (TRIGGER_UPDATE, SESSION_END, HELLO), `auth_authentik NAME|auto`, down/up,
state_file, the token, meta headers, browser_url, global issuer, session lifetime.

authentik is the emulator (authentik_emulator.py, harness.Authentik), checked against the
official client's models in test_emulator.py.  Hosts under authentik.test resolve to
127.0.0.1 in the tests; nginx reaches the emulator on 127.0.0.1:<its port>.
"""

import base64
import hashlib
import hmac
import json
import re
import time
import urllib.parse

import pytest

from harness import (CALLBACK_PATH, OUTPOST, Authentik, Browser, access_pids, children_of, echo, fresh_get,
                     is_login_form, parse_set_cookie, provider_block, query_of, session_cookie_name, sub_for)

OUTPOST_NAME = "nginx e2e outpost"
DOMAIN = "authentik.test"
# authentik's outpost waits a random 0-9 s after TRIGGER_UPDATE; then it fetches
UPDATE_WAIT = 15.0


@pytest.fixture
def authentik(tmp_path):
    """The authentik emulator, started, with no providers (function scope: each test owns it)."""
    a = Authentik(tmp_path / "authentik", outpost_name=OUTPOST_NAME)
    a.start()
    yield a
    a.stop()


# --- config ----------------------------------------------------------------------------------
def host_url(nginx, name: str, path: str = "/") -> str:
    return nginx.url(path, host=name)


def ext_host(nginx, name: str) -> str:
    """external_host of a provider served by nginx on `name`."""
    return nginx.url("", host=name).rstrip("/")


def outpost_line(ak: Authentik, token_file, **opts) -> str:
    parts = [f"authentik_outpost {ak.origin} token_file={token_file}"]
    parts += [f"{k}={v}" for k, v in opts.items() if v is not None]
    return " ".join(parts) + ";"


def server(names: str, target: str, upstream, listen_extra: str = "", extra: str = "") -> str:
    return f"""
server {{
    listen 127.0.0.1:@PORT@{(' ' + listen_extra) if listen_extra else ''};
    server_name {names};
    {extra}
    location / {{
        auth_authentik {target};
        proxy_pass {upstream.url};
    }}
}}"""


def outpost_config(ak: Authentik, tmp_path, upstream, servers: list[tuple[str, str]], listen_extra: str = "",
                   token: str | None = None, **opts) -> str:
    """session zone + authentik_outpost + one server block per (server_name, auth_authentik arg)."""
    token_file = ak.write_token_file(tmp_path / "authentik.token", token)
    blocks = [server(names, target, upstream, listen_extra if i == 0 else "") for i, (names, target)
              in enumerate(servers)]
    return "\n".join([
        "authentik_session_zone zone=authentik:16m;",
        outpost_line(ak, token_file, **opts),
        *blocks,
    ])


# --- helpers ---------------------------------------------------------------------------------
def eventually(fn, timeout: float, what: str, interval: float = 0.2):
    """fn() until it returns something truthy; that value.  AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(interval)


def authorize_prefix(ak: Authentik, origin: str | None = None) -> str:
    return f"{origin or ak.origin}/application/o/authorize/"


def first_hop_to_authorize(url: str, prefix: str, headers: dict | None = None):
    """Navigate without a session; follow nginx's own redirects until one goes to authentik's
    authorize endpoint.  Returns that response (302) or the last one."""
    b = Browser()
    try:
        return b.get(url, headers=headers, stop=lambda r: r.headers.get("Location", "").startswith(prefix))
    finally:
        b.close()


def authorize_client_id(url: str, prefix: str, headers: dict | None = None) -> str | None:
    r = first_hop_to_authorize(url, prefix, headers)
    loc = r.headers.get("Location", "")
    if r.status_code in (302, 303) and loc.startswith(prefix):
        return query_of(loc).get("client_id")
    return None


def wait_served(nginx, name: str, path: str = "/", timeout: float = 15.0):
    """Until nginx has a configuration from authentik: no more 503 for `name`."""
    return eventually(lambda: (lambda r: r if r.status_code != 503 else None)(
        fresh_get(host_url(nginx, name, path))), timeout, f"{name}: still 503 (no providers fetched)")


def verify_hs256(token: str, key: str) -> dict:
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    header = json.loads(base64.urlsafe_b64decode(pad(h)))
    assert header.get("alg") == "HS256" and "kid" not in header, header
    want = hmac.new(key.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(base64.urlsafe_b64decode(pad(s)), want), "X-authentik-jwt: bad signature"
    return json.loads(base64.urlsafe_b64decode(pad(p)))


def session_cookie(browser: Browser, prov: dict) -> str | None:
    return browser.cookie(session_cookie_name(prov["client_id"]))


def statuses(url: str, prov: dict, value: str, n: int) -> list[int]:
    """n requests, each on a new connection (so they reach different workers)."""
    name = session_cookie_name(prov["client_id"])
    return [fresh_get(url, cookies={name: value}).status_code for _ in range(n)]


def callback_hop(browser: Browser):
    cb = [h for h in browser.hops if CALLBACK_PATH in h.url]
    assert cb, browser.hops
    return cb[-1]


def session_set_cookie(browser: Browser, prov: dict):
    name = session_cookie_name(prov["client_id"])
    sc = [parse_set_cookie(v) for v in callback_hop(browser).set_cookie if v.startswith(name + "=")]
    assert sc, callback_hop(browser).set_cookie
    return sc[0]


def proxy_fetches(ak: Authentik) -> list[dict]:
    return [c for c in ak.api_calls()["calls"] if c["path"] == "/api/v3/outposts/proxy/"]


def nginx_pids(nginx) -> set[int]:
    """The master and every process under it (workers, helper processes)."""
    out, todo = set(), [nginx.proc.pid]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += list(children_of(pid) - out)
    return out


def connected_ws(view: dict) -> list[dict]:
    return [c for c in view["connections"] if c["connected"]]


# --- the tests ---------------------------------------------------------------------------------
def test_full_login_with_only_outpost_config(nginx, authentik, upstream, tmp_path):
    """nginx.conf with only authentik_outpost + auth_authentik: a full login; meta headers
    carry authentik's names; X-authentik-jwt is authentik's HS256 token."""
    app = authentik.add_provider("App Provider", "app", ext_host(nginx, f"app.{DOMAIN}"), app_name="The App")
    byname = authentik.add_provider("Other Provider", "other", ext_host(nginx, f"other.{DOMAIN}"))
    nginx.start(outpost_config(authentik, tmp_path, upstream, [
        (f"app.{DOMAIN}", "app"),                      # by application slug
        (f"other.{DOMAIN}", '"Other Provider"'),       # by provider name
    ]))
    wait_served(nginx, f"app.{DOMAIN}")
    target = host_url(nginx, f"app.{DOMAIN}", "/page?x=1")

    r = first_hop_to_authorize(target, authorize_prefix(authentik))
    assert r.status_code == 302, (r.status_code, r.text[:300])
    q = query_of(r.headers["Location"])
    assert q["client_id"] == app["client_id"]
    assert q["redirect_uri"] == ext_host(nginx, f"app.{DOMAIN}") + CALLBACK_PATH + "?X-authentik-auth-callback=true"
    assert set(q["scope"].split()) == set(app["scopes_to_request"])

    b = Browser()
    r = b.login(target, "alice")
    assert r.url == target, b.hops
    assert any("/interaction/" in h.url for h in b.hops), b.hops
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-groups") == "admins|users"
    assert e.get("X-authentik-email") == "alice@example.test"
    assert e.get("X-authentik-name") == "Alice Liddell"
    assert e.get("X-authentik-entitlements") == "app-read|app-write"
    assert e.get("X-authentik-uid") == sub_for("alice")
    assert e.get("X-Custom-Team") == "blue"
    # authentik's names, not nginx's
    assert e.get("X-authentik-meta-outpost") == OUTPOST_NAME
    assert e.get("X-authentik-meta-provider") == "App Provider"
    assert e.get("X-authentik-meta-app") == "app"
    assert e.get("X-authentik-meta-version", "").startswith("goauthentik.io/outpost/")
    jwt = verify_hs256(e.get("X-authentik-jwt"), app["client_secret"])
    assert jwt["iss"] == f"{authentik.origin}/application/o/app/"
    assert jwt["aud"] == app["client_id"] and jwt["sub"] == sub_for("alice")
    assert jwt["sid"] == hashlib.sha256(b.cookie("authentik_session").encode()).hexdigest()
    # the provider named by its provider name works the same; its own cookie
    r = b.login(host_url(nginx, f"other.{DOMAIN}", "/x"), "alice")
    e = echo(r)
    assert e.get("X-authentik-meta-provider") == "Other Provider" and e.get("X-authentik-meta-app") == "other"
    assert session_cookie(b, byname) and session_cookie(b, app)
    # a session of one provider is not one of the other
    assert statuses(host_url(nginx, f"other.{DOMAIN}", "/probe"), byname, session_cookie(b, app), 2) != [200, 200]


def test_pagination_over_105_providers(nginx, authentik, upstream, tmp_path):
    provs = authentik.add_providers([
        {"name": f"p-{i:03d}", "slug": f"s{i:03d}", "external_host": ext_host(nginx, f"s{i:03d}.{DOMAIN}")}
        for i in range(105)])
    by_name = {p["name"]: p for p in provs}
    last = by_name["p-104"]  # the API orders by name: the last one is on page 2
    nginx.start(outpost_config(authentik, tmp_path, upstream, [
        (f"s104.{DOMAIN}", "s104"),
        (f"*.{DOMAIN}", "auto"),
    ]))
    wait_served(nginx, f"s104.{DOMAIN}")
    r = Browser().login(host_url(nginx, f"s104.{DOMAIN}", "/"), "bob")
    e = echo(r)
    assert e.get("X-authentik-username") == "bob" and e.get("X-authentik-meta-provider") == "p-104"
    # one on page 1 and another on page 2 by host
    prefix = authorize_prefix(authentik)
    assert authorize_client_id(host_url(nginx, f"s000.{DOMAIN}"), prefix) == by_name["p-000"]["client_id"]
    assert authorize_client_id(host_url(nginx, f"s101.{DOMAIN}"), prefix) == by_name["p-101"]["client_id"]
    assert last["client_id"] == authorize_client_id(host_url(nginx, f"s104.{DOMAIN}"), prefix)
    pages = {query_of("?" + c["query"]).get("page") for c in proxy_fetches(authentik)}
    assert {"1", "2"} <= pages, pages
    assert all(query_of("?" + c["query"]).get("page_size") == "100" for c in proxy_fetches(authentik))


def test_provider_changes_without_reload(nginx, authentik, upstream, tmp_path):
    """Changed, added and removed in authentik, picked up after TRIGGER_UPDATE (authentik's
    outpost waits 0-9 s) without a reload."""
    app = authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    gone = authentik.add_provider("gone", "gone", ext_host(nginx, f"gone.{DOMAIN}"))
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"*.{DOMAIN}", "auto")]))
    wait_served(nginx, f"app.{DOMAIN}")
    workers = nginx.workers()
    prefix = authorize_prefix(authentik)
    b = Browser()
    echo(b.login(host_url(nginx, f"gone.{DOMAIN}", "/"), "alice"))
    gone_cookie = session_cookie(b, gone)
    assert statuses(host_url(nginx, f"gone.{DOMAIN}", "/probe"), gone, gone_cookie, 2) == [200, 200]
    # public path: authenticates first, then (changed) not
    assert fresh_get(host_url(nginx, f"app.{DOMAIN}", "/public/x")).status_code == 302
    authentik.wait_websocket(lambda v: connected_ws(v), what="the outpost's websocket")

    authentik.update_provider("app", skip_path_regex="^/public/", notify=True)
    r = eventually(lambda: (lambda r: r if r.status_code == 200 else None)(
        fresh_get(host_url(nginx, f"app.{DOMAIN}", "/public/x"))), UPDATE_WAIT, "skip_path_regex change")
    assert echo(r).path == "/public/x"
    assert fresh_get(host_url(nginx, f"app.{DOMAIN}", "/private")).status_code == 302

    assert fresh_get(host_url(nginx, f"new.{DOMAIN}")).status_code == 404
    new = authentik.add_provider("new", "new", ext_host(nginx, f"new.{DOMAIN}"), notify=True)
    eventually(lambda: authorize_client_id(host_url(nginx, f"new.{DOMAIN}"), prefix) == new["client_id"],
               UPDATE_WAIT, "added provider")

    authentik.remove_provider("gone", notify=True)
    eventually(lambda: 200 not in statuses(host_url(nginx, f"gone.{DOMAIN}", "/probe"), gone, gone_cookie, 3),
               UPDATE_WAIT, "removed provider still authenticates")
    assert fresh_get(host_url(nginx, f"gone.{DOMAIN}")).status_code == 404
    # the others are still served, and nginx was not reloaded
    assert authorize_client_id(host_url(nginx, f"app.{DOMAIN}", "/private"), prefix) == app["client_id"]
    assert nginx.workers() == workers


@pytest.mark.slow
def test_periodic_refresh_from_refresh_interval(nginx, authentik, upstream, tmp_path):
    """Without TRIGGER_UPDATE, changes come at authentik's refresh_interval_s (values below
    30 s are raised to 30 s, as authentik's outpost does)."""
    authentik.set_outpost(config={"refresh_interval": "seconds=5"})
    authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"*.{DOMAIN}", "auto")]))
    wait_served(nginx, f"app.{DOMAIN}")
    eventually(lambda: proxy_fetches(authentik), 5, "first fetch")
    authentik.reset_api_calls()
    t0 = time.monotonic()
    authentik.update_provider("app", skip_path_regex="^/public/")  # no TRIGGER_UPDATE
    time.sleep(20)
    assert proxy_fetches(authentik) == [], "refreshed sooner than every 30 s"
    assert fresh_get(host_url(nginx, f"app.{DOMAIN}", "/public/x")).status_code == 302
    eventually(lambda: fresh_get(host_url(nginx, f"app.{DOMAIN}", "/public/x")).status_code == 200,
               45 - (time.monotonic() - t0), "change at the refresh interval")
    assert len(proxy_fetches(authentik)) == 1


def test_auto_picks_provider_by_host(nginx, authentik, upstream, tmp_path):
    port = nginx.port
    shop = authentik.add_provider("shop", "shop", ext_host(nginx, f"shop.{DOMAIN}"))
    dom = authentik.add_provider("domain", "domain", ext_host(nginx, f"auth.{DOMAIN}"), mode="forward_domain",
                                 cookie_domain=DOMAIN)
    sub = authentik.add_provider("sub", "sub", ext_host(nginx, f"auth.sub.{DOMAIN}"), mode="forward_domain",
                                 cookie_domain=f"sub.{DOMAIN}")
    single = authentik.add_provider("single", "single", ext_host(nginx, f"single.sub.{DOMAIN}"),
                                    mode="forward_single")
    nginx.start(outpost_config(authentik, tmp_path, upstream, [
        (f"*.{DOMAIN} evil{DOMAIN} nomatch.example.test", "auto"),
    ]))
    wait_served(nginx, f"shop.{DOMAIN}")
    prefix = authorize_prefix(authentik)

    def cid(host, headers=None):
        return authorize_client_id(host_url(nginx, host, "/p"), prefix, headers)

    assert cid(f"shop.{DOMAIN}") == shop["client_id"]            # exact external host
    assert cid(f"single.sub.{DOMAIN}") == single["client_id"]    # exact wins over the cookie domain
    assert cid(f"x.{DOMAIN}") == dom["client_id"]                # under the cookie domain
    assert cid(f"a.b.{DOMAIN}") == dom["client_id"]
    assert cid(f"y.sub.{DOMAIN}") == sub["client_id"]            # the longest cookie domain
    assert cid(f"sub.{DOMAIN}") == sub["client_id"]              # on the cookie domain itself
    # never X-Forwarded-Host
    assert cid(f"x.{DOMAIN}", {"X-Forwarded-Host": f"shop.{DOMAIN}"}) == dom["client_id"]
    # not on a dot boundary / no match: a 404 page
    for host in (f"evil{DOMAIN}", "nomatch.example.test"):
        r = fresh_get(nginx.url("/p"), headers={"Host": f"{host}:{port}", "X-Forwarded-Host": f"shop.{DOMAIN}"})
        assert r.status_code == 404, (host, r.status_code, r.headers)
        assert "Location" not in r.headers
        assert r.text.strip() and "application/json" not in r.headers.get("Content-Type", ""), r.headers
    # a login on the domain provider: callback on its auth host, shared across hosts
    b = Browser()
    r = b.login(host_url(nginx, f"x.{DOMAIN}", "/page"), "alice")
    e = echo(r)
    assert e.get("X-authentik-meta-provider") == "domain" and e.get("X-authentik-username") == "alice"
    assert urllib.parse.urlsplit(callback_hop(b).url).hostname == f"auth.{DOMAIN}"
    r = b.get(host_url(nginx, f"z.{DOMAIN}", "/again"))
    assert echo(r).get("X-authentik-username") == "alice"
    assert not any("/application/o/" in h.url for h in b.hops), b.hops


def test_session_end_logs_out_everywhere(nginx, authentik, upstream, tmp_path, browsers):
    """SESSION_END (authentik session deleted) ends every nginx session with that sid, on every
    worker, within a second."""
    app = authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")],
                               listen_extra="reuseport"), worker_processes=4)
    wait_served(nginx, f"app.{DOMAIN}")
    authentik.wait_websocket(lambda v: any(c["hello_count"] for c in connected_ws(v)), what="HELLO")
    probe = host_url(nginx, f"app.{DOMAIN}", "/probe")
    a1, a2, bob = browsers(), browsers(), browsers()
    for br, user in ((a1, "alice"), (a2, "alice"), (bob, "bob")):
        assert echo(br.login(host_url(nginx, f"app.{DOMAIN}", "/"), user)).get("X-authentik-username") == user
    c1, c2, c3 = (session_cookie(x, app) for x in (a1, a2, bob))
    assert len({c1, c2, c3}) == 3
    assert statuses(probe, app, c1, 8) == [200] * 8

    # one authentik session (a2's) ends: only that nginx session goes
    sid2 = hashlib.sha256(a2.cookie("authentik_session").encode()).hexdigest()
    t0 = time.monotonic()
    out = authentik.session_end(session_id=sid2)
    assert out["ended"] == [sid2] and out["notified"] >= 1, out
    eventually(lambda: 200 not in statuses(probe, app, c2, 4), max(0.05, 1.0 - (time.monotonic() - t0)),
               "SESSION_END for one sid", interval=0.05)
    assert 200 not in statuses(probe, app, c2, 12)
    assert statuses(probe, app, c1, 8) == [200] * 8

    # every session of alice (by user): gone within a second, bob's stays
    t0 = time.monotonic()
    out = authentik.session_end(username="alice")
    assert len(out["ended"]) == 1 and out["notified"] >= 1, out
    eventually(lambda: 200 not in statuses(probe, app, c1, 4), max(0.05, 1.0 - (time.monotonic() - t0)),
               "SESSION_END by user", interval=0.05)
    assert 200 not in statuses(probe, app, c1, 12)
    assert statuses(probe, app, c3, 8) == [200] * 8
    # the requests did reach several workers
    assert len(access_pids(nginx)) >= 2, access_pids(nginx)


def test_authentik_down_at_start_then_up(nginx, authentik, upstream, tmp_path):
    app = authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    authentik.stop()
    conf = outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")], refresh="30s")
    rc, out = nginx.test_config(nginx.wrap(conf))
    assert rc == 0, out
    nginx.start(conf)
    for path in ("/", "/x"):
        r = fresh_get(host_url(nginx, f"app.{DOMAIN}", path))
        assert r.status_code == 503, (r.status_code, r.headers)
    where = re.escape(f"127.0.0.1:{authentik.port}")
    eventually(lambda: re.search(r"\[(warn|error|crit|alert)\][^\n]*" + where, nginx.error_log()), 10,
               "an error_log line saying authentik is unreachable")
    authentik.start()  # same port, same data
    eventually(lambda: authorize_client_id(host_url(nginx, f"app.{DOMAIN}", "/"), authorize_prefix(authentik))
               == app["client_id"], 45, "providers after authentik came up")
    e = echo(Browser().login(host_url(nginx, f"app.{DOMAIN}", "/later"), "alice"))
    assert e.get("X-authentik-username") == "alice"
    assert authentik.token not in nginx.error_log()


def test_authentik_down_sessions_and_state_file(nginx, authentik, upstream, tmp_path):
    """authentik down: existing sessions keep working, also across a reload; with state_file a
    restart of nginx still knows the providers (authentik's own outpost cannot do this)."""
    app = authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    state = tmp_path / "outpost-state.json"
    conf = outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")], state_file=state)
    nginx.start(conf)
    wait_served(nginx, f"app.{DOMAIN}")
    b = Browser()
    echo(b.login(host_url(nginx, f"app.{DOMAIN}", "/"), "alice"))
    cookie = session_cookie(b, app)
    probe = host_url(nginx, f"app.{DOMAIN}", "/probe")
    eventually(lambda: state.exists() and state.stat().st_size > 0, 10, "state_file written")

    authentik.stop()
    assert statuses(probe, app, cookie, 4) == [200] * 4
    nginx.reload()
    assert statuses(probe, app, cookie, 4) == [200] * 4
    # unauthenticated: still the redirect to authentik (the browser may reach it later)
    assert authorize_client_id(host_url(nginx, f"app.{DOMAIN}", "/"), authorize_prefix(authentik)) == app["client_id"]

    # restart (sessions are in shared memory and die with it); the providers come from state_file
    nginx.stop()
    nginx.start(conf)
    r = eventually(lambda: (lambda r: r if r.status_code != 503 else None)(
        fresh_get(host_url(nginx, f"app.{DOMAIN}", "/"))), 5, "providers from state_file")
    assert r.status_code == 302, (r.status_code, r.headers)
    assert authorize_client_id(host_url(nginx, f"app.{DOMAIN}", "/"), authorize_prefix(authentik)) == app["client_id"]
    assert authentik.token not in nginx.error_log()

    # authentik back: login works again
    authentik.start()
    e = echo(Browser().login(host_url(nginx, f"app.{DOMAIN}", "/back"), "bob"))
    assert e.get("X-authentik-username") == "bob"


def test_rejected_token(nginx, authentik, upstream, tmp_path):
    authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    bad = "wrong-token-" + "x" * 20
    conf = outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")], token=bad, refresh="30s")
    nginx.start(conf)
    # (paths under tmp_path contain "token": leave them out of the search)
    line = eventually(lambda: re.search(r"\[(warn|error|crit|alert|emerg)\][^\n]*token[^\n]*",
                                        nginx.error_log().replace(str(tmp_path), "<tmp>"), re.IGNORECASE), 10,
                      "an error_log line about the rejected token")
    assert re.search(r"403|reject|invalid|denied|forbidden|not valid", line.group(0), re.IGNORECASE), line.group(0)
    assert fresh_get(host_url(nginx, f"app.{DOMAIN}", "/")).status_code == 503
    calls = authentik.api_calls()["calls"]
    assert calls and all(c["status"] == 403 for c in calls), calls
    for log in (nginx.error_log(), nginx.access_log(), (nginx.prefix / "logs" / "stderr.log").read_text()):
        assert bad not in log
    # the websocket is refused the same way
    view = authentik.websockets()
    assert not connected_ws(view)
    # the token becomes valid in authentik: nginx gets going without a reload
    authentik.set_token(bad)
    wait_served(nginx, f"app.{DOMAIN}", timeout=45)


def test_one_process_fetches_with_4_workers(nginx, authentik, upstream, tmp_path):
    authentik.add_providers([{"name": f"app{i}", "external_host": ext_host(nginx, f"app{i}.{DOMAIN}")}
                             for i in range(3)])
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"*.{DOMAIN}", "auto")]), worker_processes=4)
    wait_served(nginx, f"app0.{DOMAIN}")
    authentik.wait_websocket(lambda v: any(c["hello_count"] for c in connected_ws(v)), what="HELLO")
    time.sleep(1.0)
    calls = authentik.api_calls()["calls"]
    pids = {c["pid"] for c in calls}
    assert len(pids) == 1 and None not in pids, authentik.api_calls()["by_pid"]
    fetcher = pids.pop()
    assert fetcher in nginx_pids(nginx), (fetcher, nginx_pids(nginx))
    assert all(c["user_agent"].startswith("goauthentik.io/outpost/") for c in calls), {c["user_agent"] for c in calls}
    assert all(c["status"] < 300 for c in calls), calls
    view = authentik.websockets()
    assert len(connected_ws(view)) == 1, view["connections"]
    assert connected_ws(view)[0]["pid"] in nginx_pids(nginx)

    # a TRIGGER_UPDATE: exactly one fetch of the provider list (<= 100 providers: one page), by one process
    authentik.reset_api_calls()
    assert authentik.trigger_update() == 1
    eventually(lambda: proxy_fetches(authentik), UPDATE_WAIT, "a fetch after TRIGGER_UPDATE")
    time.sleep(2.0)
    calls = authentik.api_calls()["calls"]
    assert len(proxy_fetches(authentik)) == 1, calls
    assert len([c for c in calls if c["path"] == "/api/v3/outposts/instances/"]) <= 1, calls
    assert {c["pid"] for c in calls} <= nginx_pids(nginx) and len({c["pid"] for c in calls}) == 1, calls
    # workers serve the new generation
    for i in range(3):
        assert fresh_get(host_url(nginx, f"app{i}.{DOMAIN}")).status_code == 302


@pytest.mark.slow
def test_websocket_reconnect_and_hello(nginx, authentik, upstream, tmp_path):
    authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")]))
    wait_served(nginx, f"app.{DOMAIN}")
    view = authentik.wait_websocket(lambda v: any(c["hello_count"] for c in connected_ws(v)), what="HELLO")
    first = connected_ws(view)[0]
    hello = first["last_hello"]
    assert hello["version"] and hello["hostname"], hello
    assert hello.get("uuid") == first["instance_uuid"], (hello, first)
    assert first["user_agent"].startswith("goauthentik.io/outpost/")
    assert first["attempt"] is not None and first["attempt"].isdigit(), first
    assert view["healthy"]

    assert authentik.drop_websockets() == 1
    t0 = time.monotonic()
    view = authentik.wait_websocket(
        lambda v: any(c["id"] > first["id"] and c["hello_count"] for c in connected_ws(v)), timeout=6,
        what="a new websocket with a HELLO after the drop")
    second = [c for c in connected_ws(view) if c["id"] > first["id"]][0]
    assert int(second["attempt"]) > int(first["attempt"]), (first, second)
    assert second["instance_uuid"] == first["instance_uuid"]
    # HELLO every 10 s keeps the outpost healthy (authentik's health cache lives 15 s)
    time.sleep(max(0.0, 12.5 - (time.monotonic() - t0)))
    view = authentik.websockets()
    now_conn = [c for c in view["connections"] if c["id"] == second["id"]][0]
    assert now_conn["connected"] and now_conn["hello_count"] >= 2, now_conn
    assert view["healthy"]
    # what authentik's UI shows for this outpost
    health = authentik.api(f"outposts/instances/{authentik.outpost()['pk']}/health/").json()
    assert len(health) == 1 and health[0]["hostname"] == hello["hostname"] and health[0]["version"] == hello["version"]
    # the connection still works: a TRIGGER_UPDATE arrives and is acted on
    authentik.reset_api_calls()
    authentik.trigger_update()
    eventually(lambda: proxy_fetches(authentik), UPDATE_WAIT, "fetch after TRIGGER_UPDATE on the new websocket")


def test_browser_url(nginx, authentik, upstream, tmp_path):
    """nginx reaches authentik on 127.0.0.1:P, browsers on auth.authentik.test:P: the browser
    endpoints and the issuer are rewritten, and the token's iss still verifies."""
    app = authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    glob = authentik.add_provider("glob", "glob", ext_host(nginx, f"glob.{DOMAIN}"), global_issuer=True)
    browser_origin = f"http://auth.{DOMAIN}:{authentik.port}"
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"*.{DOMAIN}", "auto")],
                               browser_url=browser_origin))
    wait_served(nginx, f"app.{DOMAIN}")
    prefix = authorize_prefix(authentik, browser_origin)
    for prov, host, issuer in ((app, f"app.{DOMAIN}", f"{browser_origin}/application/o/app/"),
                               (glob, f"glob.{DOMAIN}", f"{browser_origin}/")):
        assert authorize_client_id(host_url(nginx, host), prefix) == prov["client_id"]
        b = Browser()
        r = b.login(host_url(nginx, host, "/in"), "alice")
        e = echo(r)
        assert e.get("X-authentik-username") == "alice"
        assert any(h.url.startswith(browser_origin + "/interaction/") for h in b.hops), b.hops
        jwt = verify_hs256(e.get("X-authentik-jwt"), prov["client_secret"])
        assert jwt["iss"] == issuer
        # sign out goes to authentik's end-session on the browser host
        r = b.get(host_url(nginx, host, f"{OUTPOST}/sign_out"), follow=False)
        assert r.status_code == 302
        assert r.headers["Location"].startswith(f"{browser_origin}/application/o/{prov['assigned_application_slug']}"
                                                "/end-session/"), r.headers["Location"]
    # the API itself was called on the address nginx was given
    assert {c["host"] for c in authentik.api_calls()["calls"]} == {f"127.0.0.1:{authentik.port}"}


def test_global_issuer(nginx, authentik, upstream, tmp_path):
    prov = authentik.add_provider("glob", "glob", ext_host(nginx, f"glob.{DOMAIN}"), global_issuer=True)
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"glob.{DOMAIN}", "glob")]))
    wait_served(nginx, f"glob.{DOMAIN}")
    e = echo(Browser().login(host_url(nginx, f"glob.{DOMAIN}", "/"), "carol"))
    assert e.get("X-authentik-username") == "carol"
    assert verify_hs256(e.get("X-authentik-jwt"), prov["client_secret"])["iss"] == authentik.origin + "/"


def test_session_lifetime_follows_access_token_validity(nginx, authentik, upstream, tmp_path):
    short = authentik.add_provider("short", "short", ext_host(nginx, f"short.{DOMAIN}"),
                                   access_token_validity="minutes=5")
    long = authentik.add_provider("long", "long", ext_host(nginx, f"long.{DOMAIN}"),
                                  access_token_validity="hours=30")
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"*.{DOMAIN}", "auto")]))
    wait_served(nginx, f"short.{DOMAIN}")
    for prov, seconds in ((short, 300), (long, 30 * 3600)):
        b = Browser()
        host = f"{prov['name']}.{DOMAIN}"
        echo(b.login(host_url(nginx, host, "/"), "alice"))
        c = session_set_cookie(b, prov)
        assert c.attr("max-age") is not None, c.raw
        assert seconds - 60 <= int(c.attr("max-age")) <= seconds, (seconds, c.raw)


def test_login_form_is_the_emulators(nginx, authentik, upstream, tmp_path):
    """A wrong password stays on authentik's form; nothing reaches the upstream."""
    authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    nginx.start(outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")]))
    wait_served(nginx, f"app.{DOMAIN}")
    b = Browser()
    r = b.start_login(host_url(nginx, f"app.{DOMAIN}", "/"))
    assert is_login_form(r), b.hops
    r = b.submit_login(r, "alice", "not-the-password")
    assert r.status_code == 401 and 'id="login"' in r.text


def test_outpost_beside_provider_blocks(nginx, authentik, provider, upstream, tmp_path):
    """authentik_provider { } blocks keep working beside the outpost's providers."""
    app = authentik.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
    classic_origin = ext_host(nginx, f"classic.{DOMAIN}")
    client = provider.new_client([classic_origin])
    conf = "\n".join([
        outpost_config(authentik, tmp_path, upstream, [(f"app.{DOMAIN}", "app")]),
        provider_block("classic", provider.issuer, client, classic_origin),
        server(f"classic.{DOMAIN}", "classic", upstream),
    ])
    nginx.start(conf)
    wait_served(nginx, f"app.{DOMAIN}")
    b = Browser()
    e = echo(b.login(host_url(nginx, f"classic.{DOMAIN}", "/c"), "bob"))
    assert e.get("X-authentik-username") == "bob" and e.get("X-authentik-meta-provider") == "classic"
    e = echo(b.login(host_url(nginx, f"app.{DOMAIN}", "/a"), "alice"))
    assert e.get("X-authentik-username") == "alice" and e.get("X-authentik-meta-provider") == "app"
    assert session_cookie(b, app) and b.cookie(session_cookie_name(client["client_id"]))


def make_cert(d) -> tuple:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl CLI)."""
    import subprocess
    cert, key = d / "authentik.crt", d / "authentik.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_to_authentik_is_verified(nginx, upstream, tmp_path):
    """authentik over https (API, websocket, token calls): with `ca_file` naming its private CA
    everything works; without it the certificate is refused (no providers, one error line)."""
    cert, key = make_cert(tmp_path)
    ak = Authentik(tmp_path / "authentik-tls", outpost_name=OUTPOST_NAME, tls=(cert, key)).start()
    try:
        assert ak.origin.startswith("https://")
        app = ak.add_provider("app", "app", ext_host(nginx, f"app.{DOMAIN}"))
        # without ca_file: the system store does not know this certificate
        nginx.start(outpost_config(ak, tmp_path, upstream, [(f"app.{DOMAIN}", "app")], refresh="30s"))
        eventually(lambda: re.search(r"\[error\][^\n]*cannot fetch the outpost configuration[^\n]*https://127\.0\.0\.1",
                                     nginx.error_log()), 15, "an error line about authentik's certificate")
        assert fresh_get(host_url(nginx, f"app.{DOMAIN}", "/")).status_code == 503
        assert not connected_ws(ak.websockets())
        # the TLS handshake failed: no API call reached authentik
        assert ak.api_calls()["calls"] == []
        nginx.stop()
        # with ca_file: API, websocket and a whole login (token call over TLS too)
        nginx.start(outpost_config(ak, tmp_path, upstream, [(f"app.{DOMAIN}", "app")], ca_file=cert))
        wait_served(nginx, f"app.{DOMAIN}")
        ak.wait_websocket(lambda v: any(c["hello_count"] for c in connected_ws(v)), what="HELLO over wss")
        b = Browser()
        b.s.verify = str(cert)
        e = echo(b.login(host_url(nginx, f"app.{DOMAIN}", "/tls"), "alice"))
        assert e.get("X-authentik-username") == "alice"
        assert e.get("X-authentik-meta-provider") == "app"
        assert app["client_id"]
    finally:
        ak.stop()
