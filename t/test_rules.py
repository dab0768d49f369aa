"""authentik_require rules, and how the module's access decision combines with nginx's other
access modules (allow/deny, auth_basic) under `satisfy any` and `satisfy all`."""

import re

import pytest
import requests

from harness import XHR_HEADERS, Browser, echo, fresh_get, is_login_form, provider_block

# alice: groups admins|users, entitlements app-read|app-write, email_verified true
# bob:   groups users,        entitlements app-read,           email_verified false


def start(app, server_body: str, http_extra: str = "", main: str = ""):
    """nginx with provider `main` and one server whose body is `server_body`
    (@UP@ is the upstream's URL)."""
    app.client = app.client or app.new_client()
    block = provider_block("main", app.provider.issuer, app.client, app.nginx.origin)
    body = server_body.replace("@UP@", app.upstream.url)
    app.nginx.start(f"""
authentik_session_zone zone=authentik:1m;
{http_extra}
{block}
server {{
    listen 127.0.0.1:@PORT@;
{body}
}}
""", main=main)


def logged_in(app, user: str) -> Browser:
    """A browser with a session of `user` (logged in through the open location /login)."""
    b = Browser()
    r = b.login(app.url("/login"), user)
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == user, (r.status_code, b.hops)
    return b


LOGIN_LOCATION = """
    location /login { auth_authentik main; proxy_pass @UP@; }
    location /outpost.goauthentik.io/ { auth_authentik main; }
"""


def assert_denied_page(r, user: str):
    assert r.status_code == 403, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("text/html")
    assert f"&quot;{user}&quot;" in r.text, r.text
    assert 'href="/outpost.goauthentik.io/sign_out"' in r.text, r.text
    # not a login loop: no redirect, no cookie changes
    assert "Location" not in r.headers
    assert "Set-Cookie" not in r.headers


def forbidden_lines(app, since: int = 0) -> list[str]:
    return [line for line in app.nginx.error_log()[since:].splitlines() if "access forbidden by" in line]


def test_group_rule_allows_members_and_denies_others(app):
    start(app, LOGIN_LOCATION + """
    location /admin { auth_authentik main; authentik_require group admins ops; proxy_pass @UP@; }
""")
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    r = alice.get(app.url("/admin/x"))
    assert r.status_code == 200 and echo(r).path == "/admin/x"
    before = len(app.nginx.error_log())
    r = bob.get(app.url("/admin/x"))
    assert_denied_page(r, "bob")
    lines = forbidden_lines(app, before)
    assert len(lines) == 1, lines
    assert re.search(r'\[info\] .*access forbidden by "authentik_require group admins ops" for user "bob" '
                     r'while checking authentik_require rules, client: 127\.0\.0\.1, server: , '
                     r'request: "GET /admin/x HTTP/1\.1"', lines[0]), lines[0]
    # the sign-out link works from there: the session is gone afterwards
    r = bob.get(app.url("/outpost.goauthentik.io/sign_out"), follow=False)
    assert r.status_code == 302
    r = bob.get(app.url("/admin/x"), follow=False)
    assert r.status_code == 302 and "state=" in r.headers["Location"]


def test_entitlement_rule(app):
    start(app, LOGIN_LOCATION + """
    location /write { auth_authentik main; authentik_require entitlement app-write; proxy_pass @UP@; }
    location /read { auth_authentik main; authentik_require entitlement app-read; proxy_pass @UP@; }
""")
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    assert alice.get(app.url("/write")).status_code == 200
    assert_denied_page(bob.get(app.url("/write")), "bob")
    assert bob.get(app.url("/read")).status_code == 200


def test_claim_rules_strings_booleans_and_arrays(app):
    start(app, LOGIN_LOCATION + """
    location /verified { auth_authentik main; authentik_require claim email_verified true; proxy_pass @UP@; }
    location /unverified { auth_authentik main; authentik_require claim email_verified false; proxy_pass @UP@; }
    location /bob { auth_authentik main; authentik_require claim email bob@example.test; proxy_pass @UP@; }
    location /users { auth_authentik main; authentik_require claim groups users; proxy_pass @UP@; }
    location /name { auth_authentik main; authentik_require claim name "Alice Liddell"; proxy_pass @UP@; }
    location /missing { auth_authentik main; authentik_require claim department sales; proxy_pass @UP@; }
""")
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    expected = {
        "/verified": (200, 403),
        "/unverified": (403, 200),
        "/bob": (403, 200),
        "/users": (200, 200),
        "/name": (200, 403),
        "/missing": (403, 403),
    }
    for path, (for_alice, for_bob) in expected.items():
        assert alice.get(app.url(path)).status_code == for_alice, path
        assert bob.get(app.url(path)).status_code == for_bob, path


def test_every_directive_must_hold(app):
    start(app, LOGIN_LOCATION + """
    location /both {
        auth_authentik main;
        authentik_require group users;
        authentik_require entitlement app-write;
        proxy_pass @UP@;
    }
""")
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    assert alice.get(app.url("/both")).status_code == 200
    before = len(app.nginx.error_log())
    assert_denied_page(bob.get(app.url("/both")), "bob")
    # bob is in `users`: the entitlement is what failed
    lines = forbidden_lines(app, before)
    assert len(lines) == 1 and '"authentik_require entitlement app-write"' in lines[0], lines


def test_inheritance_and_override(app):
    start(app, """
    auth_authentik main;
    authentik_require group admins;
    location /login { authentik_require off; proxy_pass @UP@; }
    location / { proxy_pass @UP@; }
    location /team {
        authentik_require group users;
        proxy_pass @UP@;
        location /team/leads { proxy_pass @UP@; }
    }
    location /teams { proxy_pass @UP@; }
    location /open { authentik_require off; proxy_pass @UP@; }
    location /both { authentik_require group admins; authentik_require entitlement app-read; proxy_pass @UP@; }
""")
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    expected = {
        "/": (200, 403),            # the server's rule
        "/team": (200, 200),        # replaced, not added to
        "/team/leads": (200, 200),  # a nested location inherits its parent's
        "/teams": (200, 403),       # a sibling location the server's
        "/open": (200, 200),        # off
        "/both": (200, 403),
    }
    for path, (for_alice, for_bob) in expected.items():
        assert alice.get(app.url(path)).status_code == for_alice, path
        assert bob.get(app.url(path)).status_code == for_bob, path
    # still authentication first: no session is a login, not a 403
    r = fresh_get(app.url("/"))
    assert r.status_code == 302 and "Location" in r.headers


def test_rules_are_checked_again_after_an_internal_redirect(app):
    start(app, LOGIN_LOCATION + """
    location /go { auth_authentik main; try_files /nonexistent @admin; }
    location @admin { auth_authentik main; authentik_require group admins; proxy_pass @UP@; }
""", http_extra="root /nonexistent;")
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    r = alice.get(app.url("/go"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice"
    assert_denied_page(bob.get(app.url("/go")), "bob")


def test_requests_without_a_session_are_not_told_about_rules(app):
    """A request that is not authenticated (an API client with an Authorization header the
    module does not take, an XHR) gets the 401 challenge, not the rule's 403."""
    start(app, LOGIN_LOCATION + """
    location /admin { auth_authentik main; authentik_require group admins; proxy_pass @UP@; }
""")
    for headers in (XHR_HEADERS, {**XHR_HEADERS, "Authorization": "Bearer not-a-session"}):
        r = fresh_get(app.url("/admin"), headers=headers)
        assert r.status_code == 401, (headers, r.status_code)
        # what header authentication accepts: a Bearer token, or Basic with an app password
        assert r.raw.headers.getlist("WWW-Authenticate") == ['Bearer realm="main"', 'Basic realm="main"']
    # an API-style request with a session that fails a rule: 403, the session is a browser's
    bob = logged_in(app, "bob")
    r = bob.get(app.url("/admin"), headers=XHR_HEADERS)
    assert r.status_code == 403


def test_satisfy_any_with_allow(app):
    start(app, LOGIN_LOCATION + """
    location /lan {
        satisfy any;
        allow 127.0.0.1;
        deny all;
        auth_authentik main;
        authentik_require group admins;
        proxy_pass @UP@;
    }
    location /remote {
        satisfy any;
        allow 10.9.9.9;
        deny all;
        auth_authentik main;
        authentik_require group admins;
        proxy_pass @UP@;
    }
""")
    # allowed by address: no login, no 401, and the body reaches the upstream
    r = fresh_get(app.url("/lan"))
    assert r.status_code == 200, r.status_code
    e = echo(r)
    assert e.get("X-authentik-username") is None
    r = fresh_get(app.url("/lan"), headers=XHR_HEADERS)
    assert r.status_code == 200
    r = requests.post(app.url("/lan"), data=b"x" * 5000, headers=XHR_HEADERS, timeout=10)
    assert r.status_code == 200 and echo(r).data["body_length"] == 5000
    # forged identity headers are still removed when another module grants access
    r = fresh_get(app.url("/lan"), headers={"X-authentik-username": "mallory"})
    assert echo(r).get("X-authentik-username") is None
    # a user failing the rule is allowed by address too, with identity
    bob = logged_in(app, "bob")
    r = bob.get(app.url("/lan"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "bob"

    # not allowed by address: the module decides
    r = fresh_get(app.url("/remote"))
    assert r.status_code == 302 and "state=" in r.headers["Location"], (r.status_code, r.headers)
    r = fresh_get(app.url("/remote"), headers=XHR_HEADERS)
    assert r.status_code == 401
    assert r.raw.headers.getlist("WWW-Authenticate") == ['Bearer realm="main"', 'Basic realm="main"']
    alice = logged_in(app, "alice")
    r = alice.get(app.url("/remote"))  # before the fix: 403 (deny all) for an authenticated user
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice"
    before = len(app.nginx.error_log())
    assert_denied_page(bob.get(app.url("/remote")), "bob")
    assert len(forbidden_lines(app, before)) == 1
    # a login started under satisfy any completes
    b = Browser()
    r = b.login(app.url("/remote/deep?x=1"), "alice")
    assert r.status_code == 200 and echo(r).path == "/remote/deep"


def test_satisfy_all_with_allow(app):
    start(app, LOGIN_LOCATION + """
    location /remote {
        satisfy all;
        allow 10.9.9.9;
        deny all;
        auth_authentik main;
        proxy_pass @UP@;
    }
    location /lan {
        allow 127.0.0.1;
        deny all;
        auth_authentik main;
        proxy_pass @UP@;
    }
""")
    alice = logged_in(app, "alice")
    assert alice.get(app.url("/remote")).status_code == 403  # deny all still applies
    assert alice.get(app.url("/lan")).status_code == 200
    r = fresh_get(app.url("/lan"))
    assert r.status_code == 302  # allow alone is not enough


def htpasswd(app) -> str:
    path = app.nginx.prefix / "conf" / "htpasswd"
    path.write_text("ops:{PLAIN}ops-password\n")
    return str(path)


def test_satisfy_any_with_auth_basic(app):
    app.client = app.new_client()
    start(app, LOGIN_LOCATION + f"""
    location /api {{
        satisfy any;
        auth_basic "ops";
        auth_basic_user_file {htpasswd(app)};
        auth_authentik main;
        authentik_require group admins;
        proxy_pass @UP@;
    }}
""")
    # Basic credentials alone
    r = fresh_get(app.url("/api"), headers=XHR_HEADERS, auth=("ops", "ops-password"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") is None
    # neither: both challenges
    r = fresh_get(app.url("/api"), headers=XHR_HEADERS)
    assert r.status_code == 401
    challenges = r.raw.headers.getlist("WWW-Authenticate")
    assert 'Bearer realm="main"' in challenges and 'Basic realm="ops"' in challenges, challenges
    # wrong Basic credentials from a browser: the login
    r = fresh_get(app.url("/api"), auth=("ops", "wrong"))
    assert r.status_code == 302 and "state=" in r.headers["Location"]
    assert "WWW-Authenticate" not in r.headers, r.headers
    # a session alone
    alice = logged_in(app, "alice")
    r = alice.get(app.url("/api"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice"
    # a session failing the rule, with and without Basic credentials
    bob = logged_in(app, "bob")
    assert_denied_page(bob.get(app.url("/api")), "bob")
    r = bob.get(app.url("/api"), auth=("ops", "ops-password"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "bob"


def test_satisfy_all_with_auth_basic(app):
    app.client = app.new_client()
    start(app, LOGIN_LOCATION + f"""
    location /api {{
        auth_basic "ops";
        auth_basic_user_file {htpasswd(app)};
        auth_authentik main;
        proxy_pass @UP@;
    }}
""")
    alice = logged_in(app, "alice")
    r = alice.get(app.url("/api"))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="ops"'
    r = alice.get(app.url("/api"), auth=("ops", "ops-password"))
    assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice"
    r = fresh_get(app.url("/api"), auth=("ops", "ops-password"))
    assert r.status_code == 302  # Basic alone is not enough


@pytest.mark.parametrize("snippet, message", [
    ("authentik_require role admins;",
     'unknown rule "role", expected "group", "entitlement" or "claim"'),
    ("authentik_require group;", '"group" needs at least one value'),
    ("authentik_require claim email_verified;", '"claim" needs a claim name and at least one value'),
    ("authentik_require group admins; authentik_require off;",
     '"off" cannot be combined with other "authentik_require"'),
])
def test_bad_rules_fail_nginx_t(nginx, provider, snippet, message):
    client = provider.new_client([nginx.origin])
    conf = nginx.wrap(f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", provider.issuer, client, nginx.origin)}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{
        auth_authentik main;
        {snippet}
    }}
}}
""")
    rc, out = nginx.test_config(conf)
    assert rc != 0
    line = next(i + 1 for i, text in enumerate(conf.splitlines()) if snippet in text)
    assert f"[emerg] {message} in {nginx.last_test_conf}:{line}" in out, out


def test_rules_without_auth_fail_nginx_t(nginx, provider):
    client = provider.new_client([nginx.origin])
    conf = nginx.wrap(f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", provider.issuer, client, nginx.origin)}
server {{
    listen 127.0.0.1:@PORT@;
    location /a {{ auth_authentik main; }}
    location /admin {{
        authentik_require group admins;
    }}
}}
""")
    rc, out = nginx.test_config(conf)
    assert rc != 0
    line = next(i + 1 for i, text in enumerate(conf.splitlines()) if "authentik_require group admins" in text)
    assert (f'"authentik_require" in {nginx.last_test_conf}:{line} has no effect without "auth_authentik"'
            in out), out
