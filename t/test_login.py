"""The OIDC login through nginx (proxy mode): redirects, callback, state checks,
navigation vs. non-navigation requests, ping, client variants."""

import re
import threading
import time
import urllib.parse

import pytest

from harness import (CALLBACK_PATH, OUTPOST, XHR_HEADERS, Browser, callback_url, echo, is_login_form, links,
                     query_of, session_cookie_name, set_cookies, sub_for)

B64URL43 = re.compile(r"^[A-Za-z0-9_-]{43}$")


def authorize_redirect(app, r):
    """Assert r is the module's 302 straight to the authorization endpoint; return its query."""
    disc = app.provider.discovery()
    assert r.status_code == 302, (r.status_code, r.text[:300])
    loc = r.headers["Location"]
    assert loc.startswith(disc["authorization_endpoint"] + "?"), loc
    return query_of(loc)


def stop_at_callback(app):
    return lambda r: CALLBACK_PATH in r.headers.get("Location", "") and \
        r.headers["Location"].startswith(app.origin)


def test_ping(app):
    app.start()
    b = Browser()
    for headers in (None, XHR_HEADERS):
        r = b.get(app.url(f"{OUTPOST}/ping"), headers=headers, follow=False)
        assert r.status_code == 204, (r.status_code, r.text[:200])
        assert r.content == b""
        assert "Location" not in r.headers


def test_navigation_redirects_to_authorize(app):
    app.start()
    b = Browser()
    r = b.get(app.url("/some/page?x=1"), follow=False)
    q = authorize_redirect(app, r)
    assert q["response_type"] == "code"
    assert q["client_id"] == app.client["client_id"]
    assert q["redirect_uri"] == callback_url(app.origin)
    assert q["scope"].split() == ["openid", "profile", "email", "entitlements", "ak_proxy"]
    assert len(q["state"]) >= 16 and len(q["nonce"]) >= 16
    assert B64URL43.match(q["code_challenge"]), q["code_challenge"]
    assert q["code_challenge_method"] == "S256"
    cookie = session_cookie_name(app.client["client_id"])
    binding = [c for c in set_cookies(r) if c.name == f"{cookie}_login_{q['state'][:12]}"]
    assert binding, [c.raw for c in set_cookies(r)]
    assert binding[0].attr("path") == "/outpost.goauthentik.io/"
    assert binding[0].has("httponly")
    assert not binding[0].has("secure")
    # no session cookie is set yet
    assert not [c for c in set_cookies(r) if c.name == cookie]


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Mode": "navigate", "Accept": "*/*"},
    {"Accept": "text/html"},
    {},  # no Accept, no Sec-Fetch-Mode: a plain client following a link
], ids=["sec-fetch-navigate", "accept-html", "no-accept"])
def test_navigation_detection(app, headers):
    app.start()
    b = Browser()
    b.s.headers.clear()
    b.s.headers["User-Agent"] = "test"
    b.s.headers["Accept-Encoding"] = "identity"
    r = b.get(app.url("/"), headers=headers, follow=False)
    authorize_redirect(app, r)


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Mode": "cors", "Accept": "*/*"},
    {"X-Requested-With": "XMLHttpRequest", "Accept": "text/html, */*"},
    {"Accept": "application/json"},
    {"Sec-Fetch-Mode": "no-cors", "Accept": "text/html"},
], ids=["sec-fetch-cors", "x-requested-with", "accept-json", "sec-fetch-no-cors"])
def test_non_navigation_gets_401(app, headers):
    app.start()
    b = Browser()
    b.s.headers.clear()
    r = b.get(app.url("/api/data"), headers=headers, follow=False)
    assert r.status_code == 401, (r.status_code, r.headers)
    assert r.headers.get("WWW-Authenticate"), r.headers
    assert "Location" not in r.headers
    # a POST without a session is not redirected either
    r = b.post(app.url("/api/data"), data="x=1", headers=headers, follow=False)
    assert r.status_code == 401 and "Location" not in r.headers


def test_full_login(app):
    app.start()
    b = Browser()
    target = app.url("/app/page?x=1&y=two%20words")
    r = b.login(target, "alice")
    e = echo(r)
    # landed on the original URL, query string included
    assert r.url == target, b.hops
    assert e.path == "/app/page" and e.query == "x=1&y=two%20words"
    # the callback set the session cookie and sent us back
    cb = [h for h in b.hops if CALLBACK_PATH in h.url]
    assert len(cb) == 1, b.hops
    assert cb[0].status == 302 and urllib.parse.urljoin(cb[0].url, cb[0].location) == target
    name = session_cookie_name(app.client["client_id"])
    from harness import parse_set_cookie
    sc = [parse_set_cookie(v) for v in cb[0].set_cookie]
    sess = [c for c in sc if c.name == name]
    assert sess, cb[0].set_cookie
    c = sess[0]
    assert B64URL43.match(c.value), c.raw
    assert c.attr("path") == "/"
    assert c.has("httponly")
    assert (c.attr("samesite") or "").lower() == "lax"
    assert not c.has("secure")
    assert not c.has("domain")
    assert 3500 <= int(c.attr("max-age")) <= 3600, c.raw
    # identity headers
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-uid") == sub_for("alice")
    # the session is used on the next request without any redirect
    r2 = b.get(app.url("/again"), follow=False)
    assert echo(r2).get("X-authentik-username") == "alice"


def test_userinfo_only_claims_reach_headers(app):
    """email/name/groups are only in userinfo (not in the code flow's id_token)."""
    app.start()
    b = Browser()
    e = echo(b.login(app.url("/"), "bob"))
    assert e.get("X-authentik-username") == "bob"
    assert e.get("X-authentik-email") == "bob@example.test"
    assert e.get("X-authentik-name") == "Bob Builder"
    assert e.get("X-authentik-groups") == "users"
    assert e.get("X-authentik-entitlements") == "app-read"
    assert e.get("X-Custom-Team") == "red"
    log = app.provider.log()
    assert any(x["path"] == "/me" for x in log), \
        "the module never called the userinfo endpoint"


@pytest.mark.parametrize("alg,auth", [("RS256", "client_secret_basic"), ("HS256", "client_secret_post"),
                                      ("HS256", "client_secret_basic"), ("RS256", "client_secret_post")])
def test_client_variants(app, alg, auth):
    app.client = app.new_client(alg=alg, auth=auth)
    app.start()
    b = Browser()
    e = echo(b.login(app.url("/"), "alice"))
    assert e.get("X-authentik-username") == "alice"
    # (oidc-provider, like authentik, accepts client_secret_basic and client_secret_post
    # for either registration; the module has no directive to choose: any of them is fine)
    tok = [x for x in app.provider.log() if x["path"] == "/token"]
    assert tok, "no token request"


def test_issuer_with_path(nginx, make_provider, upstream):
    """An authentik-like issuer: http://host/application/o/<slug>/ (trailing slash)."""
    from harness import App, free_port
    port = free_port()
    p = make_provider(port=port, issuer=f"http://127.0.0.1:{port}/application/o/app/")
    app = App(nginx, p, upstream)
    app.start()
    e = echo(Browser().login(app.url("/"), "alice"))
    assert e.get("X-authentik-username") == "alice"


def test_default_external_host_is_request_host(app):
    app.start(external_host=None)
    b = Browser()
    r = b.get(app.url("/x"), follow=False)
    q = authorize_redirect(app, r)
    assert q["redirect_uri"] == callback_url(app.origin)
    assert echo(b.login(app.url("/x"))).get("X-authentik-username") == "alice"


def test_custom_scopes(app):
    app.start(provider_extra="scopes openid profile;")
    b = Browser()
    q = authorize_redirect(app, b.get(app.url("/"), follow=False))
    assert q["scope"].split() == ["openid", "profile"]
    e = echo(b.login(app.url("/")))
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-email", "") == ""
    assert e.get("X-authentik-entitlements", "") == ""
    assert e.get("X-Custom-Team") is None


def test_two_tabs(app):
    """Two logins started at once in one browser; the second finishes first; both land."""
    app.start()
    b = Browser()
    tab1 = b.start_login(app.url("/tab1?n=1"))
    assert is_login_form(tab1), b.hops
    tab2 = b.start_login(app.url("/tab2?n=2"))
    assert is_login_form(tab2), b.hops
    r2 = b.submit_login(tab2, "alice")
    assert r2.url == app.url("/tab2?n=2"), b.hops
    assert echo(r2).get("X-authentik-username") == "alice"
    r1 = b.submit_login(tab1, "alice")
    assert r1.url == app.url("/tab1?n=1"), b.hops
    assert echo(r1).get("X-authentik-username") == "alice"


def _callback_url(app, b, path="/"):
    """Log in at the provider but stop before nginx's callback; return the callback URL."""
    r = b.start_login(app.url(path))
    assert is_login_form(r), b.hops
    r = b.submit_login(r, "alice", stop=stop_at_callback(app))
    assert r.status_code in (302, 303), b.hops
    return urllib.parse.urljoin(r.url, r.headers["Location"])


def assert_state_error_page(r):
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "text/html" in r.headers.get("Content-Type", "")
    assert r.text.strip(), "empty body"
    assert any(urllib.parse.urlsplit(link).path == f"{OUTPOST}/start" for link in links(r.text)), r.text[:1000]
    assert not [c for c in set_cookies(r) if c.value and "_login_" not in c.name and c.name.startswith("authentik_proxy_")], \
        "a session cookie was set on a failed callback"


def test_tampered_state(app):
    app.start()
    b = Browser()
    cb = _callback_url(app, b)
    q = query_of(cb)
    st = q["state"]
    tampered = st[:-2] + ("AA" if st[-2:] != "AA" else "BB")
    bad = cb.replace("state=" + urllib.parse.quote(st, safe=""), "state=" + tampered)
    assert bad != cb
    assert_state_error_page(b.get(bad, follow=False))
    # a missing state too
    no_state = app.url(f"{CALLBACK_PATH}?X-authentik-auth-callback=true&code={q['code']}")
    assert_state_error_page(b.get(no_state, follow=False))


def test_replayed_state(app):
    app.start()
    b = Browser()
    cb = _callback_url(app, b)
    r = b.get(cb, follow=False)
    assert r.status_code == 302
    # the same callback again (a reload of the callback page, or an attacker's replay)
    fresh = Browser()
    assert_state_error_page(fresh.get(cb, follow=False))
    assert_state_error_page(b.get(cb, follow=False))


def test_expired_state(app):
    """A login completed after `login_timeout` is refused with the restart page."""
    # 3 s: the fresh login below must fit in it on a loaded machine too
    app.start(provider_extra="login_timeout 3s;")
    b = Browser()
    cb = _callback_url(app, b)
    time.sleep(4.2)
    assert_state_error_page(b.get(cb, follow=False))
    assert "completing authentik login" in app.nginx.error_log()
    # and a fresh login within the timeout still works
    r = app.login(Browser(), "/after")
    assert echo(r).get("X-authentik-username") == "alice"


def test_missing_binding_cookie(app):
    """The callback from another browser (no per-login binding cookie) is refused."""
    app.start()
    b = Browser()
    cb = _callback_url(app, b)
    other = Browser()
    assert_state_error_page(other.get(cb, follow=False))


def test_start_endpoint(app):
    app.start()
    b = Browser()
    r = b.get(app.url(f"{OUTPOST}/start?rd=" + urllib.parse.quote(app.url("/dest?a=1"), safe="")), follow=False)
    authorize_redirect(app, r)
    r = b.login(app.url(f"{OUTPOST}/start?rd=" + urllib.parse.quote(app.url("/dest?a=1"), safe="")))
    assert r.url == app.url("/dest?a=1"), b.hops
    assert echo(r).get("X-authentik-username") == "alice"


EVIL = [
    "http://evil.test/",
    "https://evil.test/x",
    "//evil.test/",
    "/\\evil.test/",
    "\\\\evil.test",
    "http:evil.test",
    "javascript:alert(1)",
    "http://127.0.0.1:@PORT@@evil.test/",
    "http://127.0.0.1:@PORT@.evil.test/",
    "http://evil.test/?http://127.0.0.1:@PORT@/",
    "http://evil.test\\@127.0.0.1:@PORT@/",
]


@pytest.mark.parametrize("rd", EVIL)
def test_open_redirect_refused(app, rd):
    app.start()
    rd = rd.replace("@PORT@", str(app.nginx.port))
    b = Browser()
    r = b.login(app.url(f"{OUTPOST}/start?rd=" + urllib.parse.quote(rd, safe="")))
    for h in b.hops:
        if h.location:
            host = urllib.parse.urlsplit(urllib.parse.urljoin(h.url, h.location)).hostname or ""
            assert "evil" not in host, f"redirected towards {h.location}: {b.hops}"
    assert r.url == app.url("/"), b.hops
    assert echo(r).get("X-authentik-username") == "alice"


def test_provider_timeout_gives_502(app):
    app.start(provider_extra="timeout 1s;")
    b = Browser()
    cb = _callback_url(app, b)
    app.provider.stall_token(4000)
    before = app.nginx.error_log()
    t0 = time.monotonic()
    r = b.get(cb, follow=False)
    took = time.monotonic() - t0
    assert r.status_code == 502, (r.status_code, r.text[:300])
    assert "text/html" in r.headers.get("Content-Type", "") and r.text.strip()
    assert took < 3.5, f"timeout 1s not applied: {took:.1f}s"
    new = app.nginx.error_log()[len(before):]
    assert re.search(r"\[(error|warn|crit)\]", new), new


def test_callback_without_login_attempt(app):
    app.start()
    r = Browser().get(app.url(f"{CALLBACK_PATH}?X-authentik-auth-callback=true&code=abc&state=def"), follow=False)
    assert_state_error_page(r)


def test_concurrent_logins_threads(app, browsers):
    """Several browsers logging in at the same time all succeed."""
    app.start()
    results = {}

    def run(i, user):
        b = browsers()
        try:
            results[i] = echo(b.login(app.url(f"/c{i}"), user)).get("X-authentik-username")
        except Exception as exc:  # reported below
            results[i] = repr(exc)

    users = ["alice", "bob", "carol", "alice", "bob", "carol"]
    threads = [threading.Thread(target=run, args=(i, u)) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: u for i, u in enumerate(users)}
