"""Forward auth for other proxies: this nginx as the authentik outpost of another nginx
(Debian's, without the module, running authentik's documented auth_request snippet unchanged
but for the addresses), of Debian's real Caddy (authentik's documented forward_auth
Caddyfile), and of Traefik and Envoy (their requests as their documentation describes them).

The outpost nginx (the `nginx` fixture, module loaded, on the target under test) serves only
/outpost.goauthentik.io/; the front proxies run on their own loopback ports under
app.authentik.test."""

import os
import shutil
import socket
import subprocess
import urllib.parse

import pytest
import requests

from harness import (CALLBACK_PATH, Browser, Nginx, echo, free_port, is_login_form, kill_group, parse_set_cookie,
                     provider_block, query_of, session_cookie_name, wait_port)

APP_HOST = "app.authentik.test"

# authentik's nginx configuration, verbatim from its documentation
# (website/docs/add-secure-apps/providers/proxy/_nginx_standalone.md); `front_config` changes
# only the listen address, drops the TLS lines and points the two proxy_pass at the test's
# upstream and outpost.
AUTHENTIK_NGINX_SNIPPET = r"""
# Upgrade WebSocket if requested, otherwise use keepalive
map $http_upgrade $connection_upgrade_keepalive {
    default upgrade;
    ''      '';
}

server {
    # SSL and VHost configuration
    listen                  443 ssl http2;
    server_name             _;

    ssl_certificate         /etc/ssl/certs/ssl-cert-snakeoil.pem;
    ssl_certificate_key     /etc/ssl/private/ssl-cert-snakeoil.key;

    # Increase buffer size for large headers
    # This is needed only if you get 'upstream sent too big header while reading response
    # header from upstream' error when trying to access an application protected by goauthentik
    proxy_buffers 8 16k;
    proxy_buffer_size 32k;

    location / {
        # Put your proxy_pass to your application here, and all the other statements you'll need
        # proxy_pass http://localhost:5000;
        # proxy_set_header Host $host;
        # proxy_set_header ...
        # Support for websocket
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade_keepalive;

        ##############################
        # authentik-specific config
        ##############################
        auth_request     /outpost.goauthentik.io/auth/nginx;
        error_page       401 = @goauthentik_proxy_signin;
        auth_request_set $auth_cookie $upstream_http_set_cookie;
        add_header       Set-Cookie $auth_cookie;

        # translate headers from the outposts back to the actual upstream
        auth_request_set $authentik_username $upstream_http_x_authentik_username;
        auth_request_set $authentik_groups $upstream_http_x_authentik_groups;
        auth_request_set $authentik_entitlements $upstream_http_x_authentik_entitlements;
        auth_request_set $authentik_email $upstream_http_x_authentik_email;
        auth_request_set $authentik_name $upstream_http_x_authentik_name;
        auth_request_set $authentik_uid $upstream_http_x_authentik_uid;

        proxy_set_header X-authentik-username $authentik_username;
        proxy_set_header X-authentik-groups $authentik_groups;
        proxy_set_header X-authentik-entitlements $authentik_entitlements;
        proxy_set_header X-authentik-email $authentik_email;
        proxy_set_header X-authentik-name $authentik_name;
        proxy_set_header X-authentik-uid $authentik_uid;

        # This section should be uncommented when the "Send HTTP Basic authentication" option
        # is enabled in the proxy provider
        # auth_request_set $authentik_auth $upstream_http_authorization;
        # proxy_set_header Authorization $authentik_auth;
    }

    # all requests to /outpost.goauthentik.io must be accessible without authentication
    location /outpost.goauthentik.io {
        # When using the embedded outpost, use:
        proxy_pass              http://authentik.company:9000/outpost.goauthentik.io;
        # For manual outpost deployments:
        # proxy_pass              http://outpost.company:9000;

        # Note: ensure the Host header matches your external authentik URL:
        proxy_set_header        Host $host;

        proxy_set_header        X-Original-URL $scheme://$http_host$request_uri;
        add_header              Set-Cookie $auth_cookie;
        auth_request_set        $auth_cookie $upstream_http_set_cookie;
        proxy_pass_request_body off;
        proxy_set_header        Content-Length "";
    }

    # Special location for when the /auth endpoint returns a 401,
    # redirect to the /start URL which initiates SSO
    location @goauthentik_proxy_signin {
        internal;
        add_header Set-Cookie $auth_cookie;
        return 302 /outpost.goauthentik.io/start?rd=$request_uri;
        # For domain level, use the below error_page to redirect to your authentik server with the full redirect path
        # return 302 https://authentik.company/outpost.goauthentik.io/start?rd=$scheme://$http_host$request_uri;
    }
}
"""

# authentik's Caddyfile (website/docs/add-secure-apps/providers/proxy/_caddy_standalone.mdx):
# the site block as documented, with the test's addresses (and `bind`), after a global block
# for a test run (no admin endpoint, HTTP only).
AUTHENTIK_CADDYFILE = """
{
    admin off
    auto_https off
}

http://@APP@ {
    bind 127.0.0.1
    # directive execution order is only as stated if enclosed with route.
    route {
        # always forward outpost path to actual outpost
        reverse_proxy /outpost.goauthentik.io/* @OUTPOST@

        # forward authentication to outpost
        forward_auth @OUTPOST@ {
            uri /outpost.goauthentik.io/auth/caddy

            # capitalization of the headers is important, otherwise they will be empty
            copy_headers X-Authentik-Username X-Authentik-Groups X-Authentik-Entitlements X-Authentik-Email X-Authentik-Name X-Authentik-Uid X-Authentik-Jwt X-Authentik-Meta-Jwks X-Authentik-Meta-Outpost X-Authentik-Meta-Provider X-Authentik-Meta-App X-Authentik-Meta-Version
            # Add the 'authorization' header to the list if you need proxy providers which
            # send a custom HTTP-Basic Authentication header based on values from authentik

            # optional, in this config trust all private ranges, should probably be set to the outposts IP
            trusted_proxies private_ranges
        }

        # actual site configuration below, for example
        reverse_proxy @UPSTREAM@
    }
}
"""

CANONICAL = ["X-Authentik-Username", "X-Authentik-Groups", "X-Authentik-Entitlements", "X-Authentik-Email",
             "X-Authentik-Name", "X-Authentik-Uid", "X-Authentik-Jwt", "X-Authentik-Meta-Jwks", "X-Authentik-Meta-Outpost",
             "X-Authentik-Meta-Provider", "X-Authentik-Meta-App", "X-Authentik-Meta-Version"]

UA = "Mozilla/5.0 forward-auth-test"


def front_config(outpost: Nginx, upstream_url: str) -> str:
    text = AUTHENTIK_NGINX_SNIPPET
    for old, new in [
        ("listen                  443 ssl http2;", "listen 127.0.0.1:@PORT@;"),
        ("    ssl_certificate         /etc/ssl/certs/ssl-cert-snakeoil.pem;\n", ""),
        ("    ssl_certificate_key     /etc/ssl/private/ssl-cert-snakeoil.key;\n", ""),
        ("# proxy_pass http://localhost:5000;", f"proxy_pass {upstream_url};"),
        ("http://authentik.company:9000/outpost.goauthentik.io;", f"{outpost.origin}/outpost.goauthentik.io;"),
    ]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def outpost_config(provider, client, external_host, mode="forward_single", extra="", location="auth_authentik app;",
                   blocks="") -> str:
    block = provider_block("app", provider.issuer, client, external_host, mode, extra)
    return f"""
authentik_session_zone zone=authentik:1m;
{block}
{blocks}
server {{
    listen 127.0.0.1:@PORT@;
    location /outpost.goauthentik.io/ {{
        {location}
    }}
}}
"""


def call(url, headers=None, cookies=None, method="GET"):
    with requests.Session() as s:
        s.trust_env = False
        h = {"User-Agent": UA, "Connection": "close", **(headers or {})}
        return s.request(method, url, headers=h, cookies=cookies, allow_redirects=False, timeout=15)


def identity(resp) -> dict:
    return {k: v for k, v in resp.headers.items() if k.lower().startswith("x-authentik-")}


def error_lines(nginx: Nginx, text: str) -> list[str]:
    return [line for line in nginx.error_log().splitlines() if text in line]


@pytest.fixture
def front(tmp_path):
    # Debian's nginx for the other proxy on both targets: the vendored build has no
    # auth_request module (the outpost, the `nginx` fixture, runs on the target under test)
    n = Nginx("debian", tmp_path / "front", worker_processes=1)
    yield n
    n.stop()


@pytest.fixture
def nginx_setup(nginx, front, provider, upstream):
    """The outpost nginx for the front nginx's app; the front runs authentik's snippet."""
    provider.reset()
    ext = front.url("", host=APP_HOST).rstrip("/")
    client = provider.new_client([ext])
    nginx.start(outpost_config(provider, client, ext, extra="unauth_paths ^/public/;"))
    front.start(front_config(nginx, upstream.url), load_module=False)
    return dict(ext=ext, client=client, cookie=session_cookie_name(client["client_id"]))


def test_second_nginx_with_authentiks_snippet_logs_in(nginx, front, nginx_setup):
    b = Browser()
    # the snippet's `rd=$request_uri` is not escaped: /start keeps the rest of its query as the
    # target, so every argument and escape survives (authentik's outpost keeps `x=1` only)
    target = front.url("/private/page?x=1&y=%2F&z", host=APP_HOST)
    r = b.login(target, "alice", headers={"X-authentik-username": "mallory"})
    assert r.status_code == 200 and r.url == target, b.hops
    starts = [h for h in b.hops if "/outpost.goauthentik.io/start?rd=" in (h.location or "")]
    assert starts and starts[0].status == 302, b.hops
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-groups") == "admins|users"
    assert e.get("X-authentik-email") == "alice@example.test"
    assert e.getall("X-authentik-username") == ["alice"]
    # the session cookie went to the browser through the front nginx, host-only
    sc = [parse_set_cookie(v) for h in b.hops if CALLBACK_PATH in h.url for v in h.set_cookie
          if v.startswith(nginx_setup["cookie"] + "=")]
    assert sc and not sc[0].has("domain"), b.hops
    # logged in: straight through, without a trip to the provider
    r = b.get(front.url("/other", host=APP_HOST))
    assert [h.status for h in b.hops] == [200], b.hops
    assert echo(r).get("X-authentik-uid")
    # an unauthenticated path passes without identity headers
    anon = Browser()
    r = anon.get(front.url("/public/x", host=APP_HOST), headers={"X-authentik-username": "mallory"})
    assert r.status_code == 200 and [h.status for h in anon.hops] == [200], anon.hops
    assert echo(r).get("X-authentik-username") in (None, "")


def test_auth_nginx_answers_like_authentik(nginx, nginx_setup):
    ext, name = nginx_setup["ext"], nginx_setup["cookie"]
    url = nginx.url("/outpost.goauthentik.io/auth/nginx")
    # no forward URL: authentik's configuration error, and one error_log line
    r = call(url, {"Host": APP_HOST})
    assert (r.status_code, r.text) == (500, "configuration error\n")
    assert r.headers["Content-Type"].startswith("text/plain")
    assert len(error_lines(nginx, "forward auth request has no X-Original-URI or X-Original-URL header")) == 1
    # unauthenticated: 401, plain text, no identity headers even when the client sent some
    forged = {"X-authentik-username": "mallory", "X-Authentik-Groups": "admins", "X_authentik_uid": "x"}
    r = call(url, {"Host": APP_HOST, "X-Original-URL": f"{ext}/private", **forged})
    assert (r.status_code, r.text) == (401, "unauthorized request\n")
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert identity(r) == {}
    # allowlisted, and the outpost's own paths: 200 without identity headers
    for path in ("/public/doc", "/outpost.goauthentik.io/start"):
        r = call(url, {"Host": APP_HOST, "X-Original-URL": f"{ext}{path}", **forged})
        assert (r.status_code, r.text, identity(r)) == (200, "", {}), path
    # a dot-segment does not make a path public
    r = call(url, {"Host": APP_HOST, "X-Original-URL": f"{ext}/public/../admin"})
    assert r.status_code == 401
    # a forwarded URL outside the external host: 403 and a log line
    for outside in ("http://evil.authentik.test:1/x", f"https://{APP_HOST}:{urllib.parse.urlsplit(ext).port}/"):
        r = call(url, {"Host": APP_HOST, "X-Original-URL": outside})
        assert r.status_code == 403, outside
        assert error_lines(nginx, f'forward auth URL "{outside}" is outside the external host'), outside
    # logged in
    b = Browser()
    b.login(nginx_setup["ext"] + "/", "alice")
    cookie = {name: b.cookie(name)}
    r = call(url, {"Host": APP_HOST, "X-Original-URL": f"{ext}/private", **forged}, cookies=cookie)
    assert (r.status_code, r.text) == (200, "")
    got = identity(r)
    assert list(got) == CANONICAL, got  # every header, Go's canonical case, authentik's order
    assert got["X-Authentik-Username"] == "alice"
    assert got["X-Authentik-Groups"] == "admins|users"
    assert got["X-Authentik-Meta-Provider"] == "app"
    assert got["X-Authentik-Meta-Version"].startswith("goauthentik.io/outpost/")
    assert r.headers["User-Agent"] == UA
    assert r.headers["X-Custom-Team"] == "blue"  # alice's additionalHeaders
    assert not [k for k in r.headers if "_" in k]
    # X-Original-URI (a path) wins over X-Original-URL and resolves on the external host
    r = call(url, {"Host": APP_HOST, "X-Original-URI": "/private?q=1", "X-Original-URL": "http://evil.test/"},
             cookies=cookie)
    assert r.status_code == 200 and identity(r)["X-Authentik-Username"] == "alice"


# --- Traefik: forwardAuth sends GET <address> with the original request's headers and
# X-Forwarded-Method, -Proto, -Host, -Uri, -For (doc.traefik.io, middlewares/http/forwardauth);
# the Host is the auth server's address.
def traefik_headers(origin: str, uri: str, extra=None) -> dict:
    u = urllib.parse.urlsplit(origin)
    return {"X-Forwarded-Method": "GET", "X-Forwarded-Proto": u.scheme, "X-Forwarded-Host": u.netloc,
            "X-Forwarded-Uri": uri, "X-Forwarded-For": "192.0.2.7", "Accept": "text/html", **(extra or {})}


def login_cookies(resp) -> dict:
    out = {}
    for raw in resp.raw.headers.getlist("Set-Cookie"):
        c = parse_set_cookie(raw)
        if not c.raw.split(";")[0].endswith("="):
            out[c.name] = c.value
    return out


def provider_login(authorize_url: str, user="alice") -> str:
    """Logs in at the provider; returns the callback URL it redirects to (not followed)."""
    b = Browser()
    stop = lambda r: CALLBACK_PATH in (r.headers.get("Location") or "")  # noqa: E731
    page = b.get(authorize_url, stop=stop)
    if is_login_form(page):
        page = b.submit_login(page, user, stop=stop)
    loc = page.headers.get("Location") or ""
    assert CALLBACK_PATH in loc, b.hops
    return urllib.parse.urljoin(page.url, loc)


@pytest.fixture
def traefik_setup(nginx, provider):
    provider.reset()
    ext = f"https://{APP_HOST}"
    client = provider.new_client([ext])
    nginx.start(outpost_config(provider, client, ext, extra="unauth_paths ^/public/;"))
    return dict(ext=ext, client=client, cookie=session_cookie_name(client["client_id"]),
                url=nginx.url("/outpost.goauthentik.io/auth/traefik"))


def test_traefik_login_through_forwarded_callback(nginx, provider, traefik_setup):
    ext, url, name = traefik_setup["ext"], traefik_setup["url"], traefik_setup["cookie"]
    r = call(url, traefik_headers(ext, "/app/page?x=1", {"X-authentik-username": "mallory"}))
    assert r.status_code == 302, r.text
    authorize = r.headers["Location"]
    assert authorize.startswith(provider.discovery()["authorization_endpoint"])
    assert query_of(authorize)["redirect_uri"] == f"{ext}{CALLBACK_PATH}?X-authentik-auth-callback=true"
    assert identity(r) == {}
    pending = login_cookies(r)
    assert pending, r.headers
    # the provider sends the browser to the callback on the app's host; Traefik forwards it
    callback = urllib.parse.urlsplit(provider_login(authorize))
    r = call(url, traefik_headers(ext, f"{callback.path}?{callback.query}"), cookies=pending)
    assert r.status_code == 302, r.text
    assert r.headers["Location"] == f"{ext}/app/page?x=1"
    session = {k: v for k, v in login_cookies(r).items() if k == name}
    assert session, r.headers
    r = call(url, traefik_headers(ext, "/app/other", {"X-authentik-username": "mallory"}), cookies=session)
    assert (r.status_code, r.text) == (200, "")
    assert identity(r)["X-Authentik-Username"] == "alice"
    assert list(identity(r)) == CANONICAL
    assert r.headers["User-Agent"] == UA
    # logout inside the forwarded URL: the session ends
    r = call(url, traefik_headers(ext, "/?X-authentik-logout=true"), cookies=session)
    assert r.status_code == 302
    r = call(url, traefik_headers(ext, "/app/other"), cookies=session)
    assert r.status_code == 302 and r.headers["Location"].startswith(authorize.split("?")[0])


def test_traefik_and_caddy_refuse_and_allow(nginx, traefik_setup):
    ext = traefik_setup["ext"]
    for kind in ("traefik", "caddy"):
        url = nginx.url(f"/outpost.goauthentik.io/auth/{kind}")
        # a missing proto is authentik's configuration error
        h = traefik_headers(ext, "/x")
        del h["X-Forwarded-Proto"]
        r = call(url, h)
        assert (r.status_code, r.text) == (500, "configuration error\n"), kind
        # allowlisted
        r = call(url, traefik_headers(ext, "/public/a", {"X-authentik-username": "mallory"}))
        assert (r.status_code, identity(r)) == (200, {}), kind
        # outside the external host: another host, scheme or port
        for other in ("https://evil.authentik.test", f"http://{APP_HOST}", f"https://{APP_HOST}:8443"):
            r = call(url, traefik_headers(other, "/x"))
            assert r.status_code == 403, (kind, other)
            assert "Location" not in r.headers
        # a scheme-relative target is refused as invalid
        r = call(url, traefik_headers(ext, "//evil.test/"))
        assert r.status_code == 500, kind
    assert error_lines(nginx, 'forward auth URL "https://evil.authentik.test/x" is outside the external host')
    assert error_lines(nginx, "forward auth request has no X-Forwarded-Proto header")


def test_auto_picks_the_provider_of_the_forwarded_host(nginx, provider):
    provider.reset()
    one, two = "https://one.authentik.test", "https://two.authentik.test"
    c1, c2 = provider.new_client([one]), provider.new_client([two])
    other = provider_block("second", provider.issuer, c2, two, "forward_single")
    nginx.start(outpost_config(provider, c1, one, location="auth_authentik auto;", blocks=other))
    url = nginx.url("/outpost.goauthentik.io/auth/traefik")
    for origin, client in ((one, c1), (two, c2)):
        r = call(url, traefik_headers(origin, "/x"))
        assert r.status_code == 302
        assert query_of(r.headers["Location"])["client_id"] == client["client_id"], origin
    # nginx: the host of X-Original-URL
    r = call(nginx.url("/outpost.goauthentik.io/auth/nginx"), {"X-Original-URL": f"{two}/x"})
    assert r.status_code == 401
    # a host no provider has
    r = call(url, traefik_headers("https://three.authentik.test", "/x"))
    assert r.status_code == 404


def test_forward_domain_scope_is_the_cookie_domain(nginx, provider):
    provider.reset()
    auth = "https://auth.authentik.test"
    client = provider.new_client([auth])
    nginx.start(outpost_config(provider, client, auth, mode="forward_domain",
                               extra="cookie_domain authentik.test;\n"
                                     r"unauth_paths ^https://app1\.authentik\.test/open;"))
    url = nginx.url("/outpost.goauthentik.io/auth/traefik")
    r = call(url, traefik_headers("http://app1.authentik.test:8080", "/x?y=1"))
    assert r.status_code == 302
    assert query_of(r.headers["Location"])["redirect_uri"].startswith(auth + CALLBACK_PATH)
    r = call(url, traefik_headers("https://app1.authentik.test", "/open/x"))
    assert (r.status_code, identity(r)) == (200, {})
    r = call(url, traefik_headers("https://app2.authentik.test", "/open/x"))
    assert r.status_code == 302
    for outside in ("https://authentik.test.evil.test", "https://badauthentik.test"):
        r = call(url, traefik_headers(outside, "/"))
        assert r.status_code == 403, outside
    assert error_lines(nginx, 'is outside the cookie domain "authentik.test"')


# --- Envoy: ext_authz's HTTP service appends the original path to path_prefix and sends the
# original Host (:authority) plus the allowed headers (envoyproxy.io, ext_authz filter;
# authentik's Istio docs allow `cookie`).
def test_envoy(nginx, provider, traefik_setup):
    ext, name = traefik_setup["ext"], traefik_setup["cookie"]
    url = nginx.url("/outpost.goauthentik.io/auth/envoy/app/page?x=1")
    r = call(url, {"Host": APP_HOST})
    assert r.status_code == 302
    authorize = r.headers["Location"]
    pending = login_cookies(r)
    callback = urllib.parse.urlsplit(provider_login(authorize))
    # the callback reaches the outpost directly (the /outpost.goauthentik.io route of the docs)
    r = call(nginx.url(f"{callback.path}?{callback.query}"), {"Host": APP_HOST}, cookies=pending)
    assert r.status_code == 302 and r.headers["Location"] == f"{ext}/app/page?x=1", r.text
    session = {name: login_cookies(r)[name]}
    r = call(url, {"Host": APP_HOST, "X-authentik-username": "mallory"}, cookies=session)
    assert (r.status_code, identity(r)["X-Authentik-Username"]) == (200, "alice")
    r = call(nginx.url("/outpost.goauthentik.io/auth/envoy/public/x"), {"Host": APP_HOST})
    assert (r.status_code, identity(r)) == (200, {})
    r = call(url, {"Host": "evil.authentik.test"})
    assert r.status_code == 403
    # HTTP/1.0 without Host: authentik's 400
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as s:
        s.sendall(b"GET /outpost.goauthentik.io/auth/envoy/x HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data
    assert body == b"invalid envoy request\n"


# --- Caddy: Debian's caddy with authentik's Caddyfile
@pytest.fixture
def caddy(tmp_path):
    binary = shutil.which("caddy")
    if binary is None:
        pytest.fail("caddy is not installed (apt-get install caddy; .ci/deps.sh installs it)")
    procs = []

    def start(outpost: Nginx, upstream_url: str, port: int):
        conf = tmp_path / "Caddyfile"
        text = AUTHENTIK_CADDYFILE.replace("@APP@", f"{APP_HOST}:{port}").replace("@OUTPOST@", outpost.origin)
        conf.write_text(text.replace("@UPSTREAM@", upstream_url))
        env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
               "XDG_CONFIG_HOME": str(tmp_path / "config")}
        log = open(tmp_path / "caddy.log", "wb")
        p = subprocess.Popen([binary, "run", "--config", str(conf), "--adapter", "caddyfile"], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        procs.append(p)
        try:
            wait_port(port, 15, p, "caddy")
        except Exception:
            print((tmp_path / "caddy.log").read_text()[-4000:])
            raise
        return p

    yield start
    for p in procs:
        kill_group(p)


def test_caddy_forward_auth(nginx, provider, upstream, caddy):
    provider.reset()
    port = free_port()
    ext = f"http://{APP_HOST}:{port}"
    client = provider.new_client([ext])
    nginx.start(outpost_config(provider, client, ext, extra="unauth_paths ^/public/;"))
    caddy(nginx, upstream.url, port)
    b = Browser()
    target = f"{ext}/private/page?x=1"
    r = b.login(target, "alice", headers={"X-Authentik-Username": "mallory"})
    assert r.status_code == 200 and r.url == target, b.hops
    # the first hop went straight to the provider: Caddy passed the 302 on
    assert b.hops[0].status == 302 and b.hops[0].location.startswith(provider.issuer), b.hops
    e = echo(r)
    assert e.getall("X-Authentik-Username") == ["alice"]
    assert e.get("X-Authentik-Groups") == "admins|users"
    assert e.get("X-Authentik-Meta-Provider") == "app"
    assert e.get("X-Authentik-Jwt")
    r = b.get(f"{ext}/again")
    assert [h.status for h in b.hops] == [200] and echo(r).get("X-Authentik-Username") == "alice"
    anon = Browser()
    r = anon.get(f"{ext}/public/x", headers={"X-Authentik-Username": "mallory"})
    assert [h.status for h in anon.hops] == [200], anon.hops
    # Caddy 2.6 puts its placeholder in place of a header the auth response lacks
    assert echo(r).get("X-Authentik-Username") in (None, "", "{http.reverse_proxy.header.X-Authentik-Username}")
