"""forward_single and forward_domain modes.

forward_domain: nginx answers for app1/app2/auth.authentik.test (every name under
authentik.test resolves to 127.0.0.1 inside the tests, see harness.install_test_resolver);
the session cookie has Domain=authentik.test, the callback is on the auth host
(external_host http://auth.authentik.test:PORT)."""

import urllib.parse

import pytest

from harness import (CALLBACK_PATH, OUTPOST, XHR_HEADERS, Browser, callback_url, echo, parse_set_cookie,
                     session_cookie_name)
from test_headers import FORGED, forged_left

DOMAIN = "authentik.test"


def domain_app(app, provider_extra="", server_extra=""):
    auth = app.nginx.url("", host=f"auth.{DOMAIN}").rstrip("/")
    app.client = app.new_client([auth])
    app.start(mode="forward_domain", external_host=auth,
              provider_extra=f"cookie_domain {DOMAIN};\n" + provider_extra,
              server_extra="underscores_in_headers on;\n" + server_extra)
    app.auth_origin = auth
    return app


def test_forward_single_login(app):
    app.start(mode="forward_single")
    b = Browser()
    r = b.login(app.url("/single?q=1"), "alice")
    assert r.url == app.url("/single?q=1"), b.hops
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-groups") == "admins|users"
    assert e.get("X-authentik-meta-provider") == "main"
    name = session_cookie_name(app.client["client_id"])
    cb = [h for h in b.hops if CALLBACK_PATH in h.url][0]
    c = [parse_set_cookie(v) for v in cb.set_cookie if v.startswith(name + "=")][0]
    assert not c.has("domain"), c.raw


def test_forward_domain_shared_login(app):
    domain_app(app)
    name = session_cookie_name(app.client["client_id"])
    app1 = app.nginx.url("/page?x=1", host=f"app1.{DOMAIN}")
    b = Browser()
    r = b.login(app1, "alice")
    assert r.url == app1, b.hops
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    # the provider was sent the auth host's callback
    auths = [h for h in b.hops if h.location and "redirect_uri=" in h.location]
    assert auths, b.hops
    from harness import query_of
    assert query_of(auths[0].location)["redirect_uri"] == callback_url(app.auth_origin)
    # the callback ran on the auth host and set a domain cookie
    cb = [h for h in b.hops if CALLBACK_PATH in h.url]
    assert cb and urllib.parse.urlsplit(cb[0].url).hostname == f"auth.{DOMAIN}", b.hops
    sc = [parse_set_cookie(v) for v in cb[0].set_cookie if v.startswith(name + "=")]
    assert sc, cb[0].set_cookie
    assert sc[0].attr("domain", "").lstrip(".") == DOMAIN, sc[0].raw
    assert sc[0].attr("path") == "/"
    # app2 shares the session: no trip to the provider
    app2 = app.nginx.url("/other", host=f"app2.{DOMAIN}")
    r = b.get(app2)
    assert [h.url for h in b.hops] == [app2], b.hops
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-email") == "alice@example.test"


def test_forward_domain_unauth_paths_match_full_url(app):
    port = app.nginx.port
    domain_app(app, provider_extra=rf"unauth_paths ^http://app1\.authentik\.test:{port}/public/;")
    b = Browser()
    r = b.get(app.nginx.url("/public/x", host=f"app1.{DOMAIN}"), headers=FORGED, follow=False)
    e = echo(r)
    assert forged_left(e) == [], e.headers
    # the same path on another host is protected: the regex sees the whole URL
    r = b.get(app.nginx.url("/public/x", host=f"app2.{DOMAIN}"), follow=False)
    assert r.status_code == 302, r.status_code
    r = b.get(app.nginx.url("/public/x", host=f"app2.{DOMAIN}"), headers=XHR_HEADERS, follow=False)
    assert r.status_code == 401


@pytest.mark.parametrize("rd,lands", [
    ("http://app2.authentik.test:@PORT@/dest?a=1", "http://app2.authentik.test:@PORT@/dest?a=1"),
    ("http://authentik.test:@PORT@/", "http://authentik.test:@PORT@/"),
    ("http://evil.test/", "AUTH/"),
    ("http://evilauthentik.test:@PORT@/", "AUTH/"),
    ("http://authentik.test.evil.test/", "AUTH/"),
    ("//evil.test/", "AUTH/"),
    ("http://app1.authentik.test:@PORT@@evil.test/", "AUTH/"),
], ids=["subdomain", "apex", "evil", "no-dot-boundary", "suffix-trick", "scheme-relative", "userinfo"])
def test_forward_domain_rd(app, rd, lands):
    domain_app(app)
    port = str(app.nginx.port)
    rd = rd.replace("@PORT@", port)
    lands = lands.replace("@PORT@", port).replace("AUTH", app.auth_origin)
    b = Browser()
    start = f"{app.auth_origin}{OUTPOST}/start?rd=" + urllib.parse.quote(rd, safe="")
    r = b.login(start)
    for h in b.hops:
        if h.location:
            host = urllib.parse.urlsplit(urllib.parse.urljoin(h.url, h.location)).hostname or ""
            assert "evil" not in host, f"redirected towards {h.location}: {b.hops}"
    assert r.url == lands, b.hops
    assert echo(r).get("X-authentik-username") == "alice"
