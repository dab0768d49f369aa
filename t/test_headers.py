"""What the upstream receives: identity headers, forged headers stripped, the session
cookie hidden, unauthenticated paths, variables."""

import pytest

from harness import IDENTITY_HEADERS, XHR_HEADERS, Browser, echo, session_cookie_name, sub_for

FORGED = {
    "X-authentik-username": "mallory",
    "x-AUTHENTIK-groups": "admins",
    "X-Authentik-Email": "mallory@evil.test",
    "X-authentik-uid": "0000",
    "X-AUTHENTIK-JWT": "forged.jwt.value",
    "X-authentik-meta-provider": "evil",
    "X_authentik_name": "Mallory",
    "x_authentik_entitlements": "everything",
    "X-authentik_username": "mallory2",
}


def forged_left(e):
    """Identity headers in the echo that carry a forged value."""
    bad = set(FORGED.values())
    return [(k, v) for k, v in e.headers if k.lower().replace("_", "-").startswith("x-authentik-") and v in bad]


def test_identity_headers(app):
    app.start()
    b = Browser()
    e = echo(b.login(app.url("/headers"), "alice"))
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-groups") == "admins|users"
    assert e.get("X-authentik-entitlements") == "app-read|app-write"
    assert e.get("X-authentik-email") == "alice@example.test"
    assert e.get("X-authentik-name") == "Alice Liddell"
    assert e.get("X-authentik-uid") == sub_for("alice")
    assert e.get("X-authentik-jwt"), "empty X-authentik-jwt"
    assert e.get("X-authentik-meta-provider") == "main"
    for h in ("X-authentik-meta-outpost", "X-authentik-meta-app", "X-authentik-meta-version"):
        assert e.get(h) is not None, f"{h} missing: {e.headers}"
    assert e.get("X-authentik-meta-version"), "empty X-authentik-meta-version"
    # proxy mode: the client's Host
    assert e.get("X-Forwarded-Host") == f"127.0.0.1:{app.nginx.port}"
    # ak_proxy.user_attributes.additionalHeaders
    assert e.get("X-Custom-Team") == "blue"
    # each identity header exactly once
    for h in IDENTITY_HEADERS:
        assert len(e.like(h)) == 1, (h, e.like(h))


def test_missing_claims_give_empty_headers(app):
    app.start()
    b = Browser()
    e = echo(b.login(app.url("/"), "carol"))
    assert e.get("X-authentik-username") == "carol"
    assert e.get("X-authentik-uid") == sub_for("carol")
    for h in ("X-authentik-groups", "X-authentik-entitlements", "X-authentik-email", "X-authentik-name"):
        assert e.get(h, "") == "", (h, e.like(h))
    assert e.get("X-Custom-Team") is None
    # forged values do not fill the gaps
    r = b.get(app.url("/"), headers=FORGED)
    e = echo(r)
    assert forged_left(e) == [], e.headers
    assert e.get("X-authentik-username") == "carol"


def test_forged_headers_on_authenticated_requests(app):
    app.start(server_extra="underscores_in_headers on;")
    b = Browser()
    b.login(app.url("/"), "alice")
    e = echo(b.get(app.url("/forged"), headers=FORGED))
    assert forged_left(e) == [], e.headers
    assert [v for _, v in e.like("X-authentik-username")] == ["alice"]
    assert [v for _, v in e.like("X-authentik-groups")] == ["admins|users"]
    assert [v for _, v in e.like("X-authentik-name")] == ["Alice Liddell"]
    assert [v for _, v in e.like("X-authentik-meta-provider")] == ["main"]


def test_session_cookie_hidden_from_upstream(app):
    app.start()
    b = Browser()
    b.login(app.url("/"), "alice")
    name = session_cookie_name(app.client["client_id"])
    assert b.cookie(name), list(b.cookies)
    b.cookies.set("theme", "dark", domain="127.0.0.1", path="/")
    b.cookies.set("zz_other", "1", domain="127.0.0.1", path="/")
    e = echo(b.get(app.url("/cookies")))
    assert e.get("X-authentik-username") == "alice"
    cookies = e.cookies()
    assert name not in cookies, e.getall("Cookie")
    assert cookies.get("theme") == "dark" and cookies.get("zz_other") == "1", e.getall("Cookie")
    assert not any(k.startswith("authentik_proxy_") for k in cookies), cookies
    # only the session cookie: no Cookie header left, or an empty one
    only = Browser()
    only.cookies.set(name, b.cookie(name), domain="127.0.0.1", path="/")
    e = echo(only.get(app.url("/only")))
    assert e.get("X-authentik-username") == "alice"
    assert all(not v.strip() or name not in v for v in e.getall("Cookie")), e.getall("Cookie")


UNAUTH_PROVIDER = r"unauth_paths ^/public/ ^/api/health$;"
UNAUTH_SERVER = r"authentik_unauth_paths ^/robots\.txt$;"


@pytest.mark.parametrize("mode", ["proxy", "forward_single"])
def test_unauth_paths(app, mode):
    app.start(mode=mode, provider_extra=UNAUTH_PROVIDER, server_extra="underscores_in_headers on;\n" + UNAUTH_SERVER)
    b = Browser()
    for path in ("/public/", "/public/a/b?x=1", "/api/health", "/robots.txt"):
        for headers in ({}, XHR_HEADERS):
            r = b.get(app.url(path), headers={**headers, **FORGED}, follow=False)
            e = echo(r)
            assert forged_left(e) == [], (path, e.headers)
            assert all(v == "" for _, v in e.like("X-authentik-username")), (path, e.headers)
    # anchors and the rest stay protected
    for path in ("/api/health/x", "/api/healthz", "/private", "/xpublic/", "/robots.txt.bak"):
        r = b.get(app.url(path), follow=False)
        assert r.status_code == 302, (path, r.status_code)
        r = b.get(app.url(path), headers=XHR_HEADERS, follow=False)
        assert r.status_code == 401, (path, r.status_code)
    # after login, protected paths work and identity shows up
    e = echo(b.login(app.url("/private")))
    assert e.get("X-authentik-username") == "alice"


def test_location_unauth_paths_and_auth_off(app, upstream):
    loc = f"""
    location /docs/ {{
        auth_authentik main;
        authentik_unauth_paths ^/docs/public;
        proxy_pass {upstream.url};
    }}
"""
    app.start(server_extra="underscores_in_headers on;\n" + loc)
    b = Browser()
    e = echo(b.get(app.url("/docs/public/x"), headers=FORGED, follow=False))
    assert forged_left(e) == []
    assert b.get(app.url("/docs/private"), follow=False).status_code == 302
    # auth_authentik off: no authentication; forged identity headers do not matter to us here
    e = echo(b.get(app.url("/open/thing"), follow=False))
    assert e.path == "/open/thing"


def test_variables(app):
    loc = """
        proxy_set_header X-Var-User $authentik_username;
        proxy_set_header X-Var-Groups $authentik_groups;
        proxy_set_header X-Var-Entitlements $authentik_entitlements;
        proxy_set_header X-Var-Email $authentik_email;
        proxy_set_header X-Var-Name $authentik_name;
        proxy_set_header X-Var-Uid $authentik_uid;
        proxy_set_header X-Var-Jwt $authentik_jwt;
        proxy_set_header X-Var-Claim-Email $authentik_claim_email;
        proxy_set_header X-Var-Claim-Pu $authentik_claim_preferred_username;
        add_header X-Seen-User $authentik_username always;
"""
    app.start(location_extra=loc)
    b = Browser()
    r = b.login(app.url("/vars"), "alice")
    e = echo(r)
    assert e.get("X-Var-User") == "alice"
    assert e.get("X-Var-Groups") == "admins|users"
    assert e.get("X-Var-Entitlements") == "app-read|app-write"
    assert e.get("X-Var-Email") == "alice@example.test"
    assert e.get("X-Var-Name") == "Alice Liddell"
    assert e.get("X-Var-Uid") == sub_for("alice")
    assert e.get("X-Var-Jwt") == e.get("X-authentik-jwt")
    assert e.get("X-Var-Claim-Email") == "alice@example.test"
    assert e.get("X-Var-Claim-Pu") == "alice"
    assert r.headers.get("X-Seen-User") == "alice"
