"""Header authentication (Authorization: Bearer / Basic, as authentik's outpost does it), HTTP
Basic credentials to the upstream, ak_proxy.backend_override / host_header as
$authentik_backend / $authentik_host_header, X-authentik-meta-jwks, additionalHeaders that
replace a standard header, and the ?X-authentik-logout=true signature.

authentik is the emulator (harness.Authentik: introspection, client_credentials with app
passwords, per-user scope mappings, counted OAuth calls); the generic OIDC path is the real
oidc-provider (its RFC 7662 introspection endpoint).
"""
import base64
import json
import re
import time

import pytest

from harness import Browser, Upstream, echo, fresh_get, provider_block, session_cookie_name, sub_for
from test_outpost import (DOMAIN, authentik, eventually, ext_host, host_url, outpost_config,  # noqa: F401
                          wait_served)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def app_token(ak, prov: dict, user: str = "alice", password: str | None = None) -> dict:
    """Tokens straight from the emulator's token endpoint (client_credentials with an app
    password), as a script would get them."""
    password = password or f"app-password-of-{user}"
    ak.app_password(user, password)
    import requests
    r = requests.post(f"{ak.origin}/application/o/token/", data={
        "grant_type": "client_credentials", "client_id": prov["client_id"], "username": user,
        "password": password, "scope": " ".join(prov["scopes_to_request"])}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def introspections(ak) -> list:
    return [c for c in ak.oauth_calls() if c["path"] == "/application/o/introspect/"]


def token_grants(ak) -> list:
    return [c for c in ak.oauth_calls() if c["path"] == "/application/o/token/"]


def start_app(nginx, ak, tmp_path, upstream, workers: int = 2, **provider_fields):
    prov = ak.add_provider("App", "app", ext_host(nginx, f"app.{DOMAIN}"), **provider_fields)
    nginx.start(outpost_config(ak, tmp_path, upstream, [(f"app.{DOMAIN}", "app")], listen_extra="reuseport"),
                worker_processes=workers)
    wait_served(nginx, f"app.{DOMAIN}")
    return prov


def get(nginx, path="/api", headers=None, cookies=None):
    return fresh_get(host_url(nginx, f"app.{DOMAIN}", path), headers=headers, cookies=cookies)


# --- Bearer ----------------------------------------------------------------------------------
def test_bearer_valid_sets_identity_and_hides_authorization(nginx, authentik, upstream, tmp_path):
    prov = start_app(nginx, authentik, tmp_path, upstream)
    tokens = app_token(authentik, prov)
    r = get(nginx, headers={**bearer(tokens["access_token"]), "Accept": "application/json"})
    assert r.status_code == 200, (r.status_code, r.text[:300])
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-uid") == sub_for("alice")
    assert e.get("X-authentik-groups") == "admins|users"
    assert e.get("X-authentik-jwt") == tokens["access_token"]      # the bearer token itself
    assert e.getall("Authorization") == [], "Authorization reached the upstream"
    assert "Set-Cookie" not in r.headers
    # a cached request: the same again, no second introspection
    before = len(introspections(authentik))
    r = get(nginx, headers=bearer(tokens["access_token"]))
    assert echo(r).get("X-authentik-username") == "alice"
    assert echo(r).getall("Authorization") == []
    assert len(introspections(authentik)) == before
    assert tokens["access_token"] not in nginx.error_log()


def test_bearer_refused_401_or_redirect(nginx, authentik, upstream, tmp_path):
    prov = start_app(nginx, authentik, tmp_path, upstream, access_token_validity=2)
    other = authentik.add_provider("Other", "other", ext_host(nginx, f"other.{DOMAIN}"))
    expired = app_token(authentik, prov)["access_token"]
    revoked = app_token(authentik, prov, "bob")["access_token"]
    foreign = app_token(authentik, other)["access_token"]
    import requests
    requests.post(f"{authentik.origin}/application/o/revoke/", data={"token": revoked}, timeout=10)
    time.sleep(3)  # `expired` outlives its 2 s validity
    for name, token in (("expired", expired), ("revoked", revoked), ("another client's", foreign),
                        ("garbage", "not-a-token")):
        r = get(nginx, "/page", headers={**bearer(token), "Accept": "text/html"})
        assert r.status_code == 401, (name, r.status_code, r.headers)
        assert "Unauthenticated" in r.text, name
        challenges = r.raw.headers.getlist("WWW-Authenticate")
        assert any(c.startswith("Bearer") for c in challenges) and any(c.startswith("Basic") for c in challenges), \
            challenges
        assert "Location" not in r.headers
    # a scheme nobody accepts is refused without asking the provider
    n = len(introspections(authentik))
    assert get(nginx, headers={"Authorization": "Digest x=1"}).status_code == 401
    assert len(introspections(authentik)) == n
    log = nginx.error_log()
    assert "authorization header refused" in log
    for token in (expired, revoked, foreign):
        assert token not in log


def test_intercept_off_falls_back_to_login(nginx, authentik, upstream, tmp_path):
    start_app(nginx, authentik, tmp_path, upstream, intercept_header_auth=False)
    r = get(nginx, "/page", headers={**bearer("wrong"), "Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
    assert r.status_code == 302, (r.status_code, r.headers)
    assert "/application/o/authorize/" in r.headers["Location"]


def test_cache_is_shared_across_workers_and_failures_are_cached(nginx, authentik, upstream, tmp_path):
    prov = start_app(nginx, authentik, tmp_path, upstream, workers=4)
    token = app_token(authentik, prov)["access_token"]
    authentik.oauth_calls(reset=True)
    for _ in range(24):
        r = get(nginx, headers=bearer(token))
        assert echo(r).get("X-authentik-username") == "alice"
    assert len(introspections(authentik)) == 1, introspections(authentik)
    # a wrong token: one call, then the cached failure answers
    authentik.oauth_calls(reset=True)
    for _ in range(16):
        assert get(nginx, headers=bearer("wrong-token")).status_code == 401
    assert len(introspections(authentik)) == 1, introspections(authentik)
    # the requests did reach several workers
    from harness import access_pids
    assert len(access_pids(nginx)) >= 2, access_pids(nginx)


# --- Basic -------------------------------------------------------------------------------------
def test_basic_with_app_password_and_token_username(nginx, authentik, upstream, tmp_path):
    prov = start_app(nginx, authentik, tmp_path, upstream)
    authentik.app_password("bob", "bobs-app-password")
    r = get(nginx, headers=basic("bob", "bobs-app-password"))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    e = echo(r)
    assert e.get("X-authentik-username") == "bob"
    jwt = e.get("X-authentik-jwt")
    claims = jwt_claims(jwt)                                     # the id_token
    assert claims["aud"] == prov["client_id"] and claims["sub"] == sub_for("bob") and "azp" not in claims
    assert e.getall("Authorization") == []
    grant = [c for c in token_grants(authentik)]
    assert grant, authentik.oauth_calls()
    # a wrong password: 401 page, no identity
    r = get(nginx, headers=basic("bob", "not-it"))
    assert r.status_code == 401 and "Unauthenticated" in r.text
    # username goauthentik.io/token: the password is a token
    token = app_token(authentik, prov, "carol")["access_token"]
    r = get(nginx, headers=basic("goauthentik.io/token", token))
    assert r.status_code == 200
    assert echo(r).get("X-authentik-username") == "carol"
    assert echo(r).get("X-authentik-jwt") == token
    assert "bobs-app-password" not in nginx.error_log()


# --- the generic OIDC path: the real oidc-provider's introspection ------------------------------
def test_bearer_against_oidc_provider(nginx, provider, upstream, target):
    client = provider.new_client(nginx.origin)
    other = provider.new_client(nginx.origin)
    nginx.start(f"""
authentik_session_zone zone=authentik:8m;
{provider_block("app", provider.issuer, client)}
{provider_block("other", provider.issuer, other)}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik app; proxy_pass {upstream.url}; }}
    location /other/ {{ auth_authentik other; proxy_pass {upstream.url}; }}
}}""")
    b = Browser()
    e = echo(b.login(nginx.url("/"), "alice"))
    access_token = e.get("X-authentik-jwt")
    assert access_token
    r = fresh_get(nginx.url("/api"), headers=bearer(access_token))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    e = echo(r)
    assert e.get("X-authentik-uid") == sub_for("alice")
    assert e.get("X-authentik-jwt") == access_token
    assert e.getall("Authorization") == []
    # another client's token: oidc-provider answers active: false to that client
    r = fresh_get(nginx.url("/other/api"), headers=bearer(access_token))
    assert r.status_code == 401, (r.status_code, r.headers)


# --- Basic to the upstream ---------------------------------------------------------------------
def test_basic_auth_to_upstream_from_the_api(nginx, authentik, upstream, tmp_path):
    authentik.user_attributes("alice", upstream_user="alice-at-app", upstream_password="s3cret")
    authentik.user_attributes("bob", upstream_password="bobs-upstream-pw")   # no user attribute: email
    start_app(nginx, authentik, tmp_path, upstream, basic_auth_enabled=True,
              basic_auth_user_attribute="upstream_user", basic_auth_password_attribute="upstream_password")
    for user, expected in (("alice", "alice-at-app:s3cret"), ("bob", "bob@example.test:bobs-upstream-pw")):
        b = Browser()
        b.login(host_url(nginx, f"app.{DOMAIN}", "/"), user)
        r = b.get(host_url(nginx, f"app.{DOMAIN}", "/x"), headers={"Authorization": "Basic Zm9yZ2VkOmZvcmdlZA=="})
        got = echo(r).getall("Authorization")
        assert got == ["Basic " + base64.b64encode(expected.encode()).decode()], (user, got)
    # carol has no password attribute: no Authorization at all (the client's is not passed either)
    b = Browser()
    b.login(host_url(nginx, f"app.{DOMAIN}", "/"), "carol")
    r = b.get(host_url(nginx, f"app.{DOMAIN}", "/x"), headers={"Authorization": "Basic Zm9yZ2VkOmZvcmdlZA=="})
    assert echo(r).getall("Authorization") in ([], ["Basic Zm9yZ2VkOmZvcmdlZA=="])


def test_basic_auth_to_upstream_from_provider_block_directives(nginx, authentik, upstream, tmp_path):
    """The same from `authentik_provider { }` directives (authentik's provider, configured by hand)."""
    authentik.user_attributes("alice", pw_attr="from-block")
    prov = authentik.add_provider("Manual", "manual", nginx.origin)
    issuer = prov["oidc_configuration"]["issuer"]
    nginx.start(f"""
authentik_session_zone zone=authentik:8m;
authentik_provider manual {{
    issuer {issuer};
    client_id {prov["client_id"]};
    client_secret {prov["client_secret"]};
    external_host {nginx.origin};
    basic_auth_password_attribute pw_attr;
    intercept_header_auth off;
}}
server {{ listen 127.0.0.1:@PORT@; location / {{ auth_authentik manual; proxy_pass {upstream.url}; }} }}""")
    b = Browser()
    e = echo(b.login(nginx.url("/"), "alice"))
    assert e.getall("Authorization") == ["Basic " + base64.b64encode(b"alice@example.test:from-block").decode()]
    # intercept_header_auth off: a wrong Authorization falls back to the login redirect
    r = fresh_get(nginx.url("/p"), headers={**bearer("nope"), "Accept": "text/html"})
    assert r.status_code == 302 and "/application/o/authorize/" in r.headers["Location"], r.headers


def test_bad_intercept_value_fails_nginx_t(nginx, provider):
    client = provider.new_client(nginx.origin)
    conf = f"""
authentik_session_zone zone=authentik:8m;
{provider_block("app", provider.issuer, client, extra="intercept_header_auth maybe;")}
server {{ listen 127.0.0.1:@PORT@; location / {{ auth_authentik app; }} }}"""
    rc, out = nginx.test_config(nginx.wrap(conf))
    assert rc != 0 and "intercept_header_auth" in out and re.search(r"\.conf:\d+", out), out


# --- $authentik_backend and $authentik_host_header -----------------------------------------------
def test_backend_override_per_user(nginx, authentik, upstream, tmp_path):
    second = Upstream(tmp_path / "second").start()
    try:
        by_user = {
            "alice": {"ak_proxy": {"backend_override": upstream.url, "host_header": "alice.internal"}},
            "bob": {"ak_proxy": {"backend_override": second.url, "host_header": "bob.internal:8443"}},
            "carol": {"ak_proxy": {"backend_override": "file:///etc/passwd", "host_header": "bad host"}},
        }
        prov = authentik.add_provider("App", "app", ext_host(nginx, f"app.{DOMAIN}"),
                                      scopes=["openid", "profile", "email", "entitlements", "ak_proxy", "backend"],
                                      scope_claims={"backend": {"by_user": by_user}})
        assert "backend" in prov["scopes_to_request"]
        token_file = authentik.write_token_file(tmp_path / "token")
        nginx.start(f"""
authentik_session_zone zone=authentik:8m;
authentik_outpost {authentik.origin} token_file={token_file};
server {{
    listen 127.0.0.1:@PORT@;
    server_name app.{DOMAIN};
    location / {{
        auth_authentik app;
        add_header X-Upstream $upstream_addr always;
        add_header X-Backend "$authentik_backend" always;
        proxy_set_header Host $authentik_host_header;
        proxy_pass $authentik_backend;
    }}
    location /vars {{
        auth_authentik app;
        proxy_set_header X-Backend "$authentik_backend";
        proxy_set_header X-Host-Header "$authentik_host_header";
        proxy_pass {upstream.url};
    }}
}}""")
        wait_served(nginx, f"app.{DOMAIN}")
        for user, target, host in (("alice", upstream, "alice.internal"), ("bob", second, "bob.internal:8443")):
            b = Browser()
            r = b.login(host_url(nginx, f"app.{DOMAIN}", "/page"), user)
            assert r.headers.get("X-Upstream") == f"127.0.0.1:{target.port}", (user, r.headers)
            assert echo(r).get("Host") == host
            assert echo(r).get("X-authentik-username") == user
        b = Browser()
        b.login(host_url(nginx, f"app.{DOMAIN}", "/vars"), "carol")
        e = echo(b.get(host_url(nginx, f"app.{DOMAIN}", "/vars")))
        assert e.get("X-Backend") in (None, "") and e.get("X-Host-Header") in (None, ""), e
        log = nginx.error_log()
        assert log.count("backend_override") == 1 and "is not an http or https URL" in log, log[-2000:]
        assert log.count("ak_proxy.host_header") == 1
    finally:
        second.stop()


# --- header details ------------------------------------------------------------------------------
def test_meta_jwks_and_additional_headers_replace(nginx, authentik, upstream, tmp_path):
    authentik.user_attributes("alice", additionalHeaders={"X-Custom-Team": "blue",
                                                          "X-authentik-email": "team@example.test"})
    prov = start_app(nginx, authentik, tmp_path, upstream)
    b = Browser()
    e = echo(b.login(host_url(nginx, f"app.{DOMAIN}", "/"), "alice"))
    assert e.getall("X-authentik-meta-jwks") == [prov["oidc_configuration"]["jwks_uri"]], e
    assert e.getall("X-authentik-email") == ["team@example.test"], e.getall("X-authentik-email")
    assert e.getall("X-Custom-Team") == ["blue"]
    # a client's forged meta-jwks never arrives
    e = echo(b.get(host_url(nginx, f"app.{DOMAIN}", "/"), headers={"X-authentik-meta-jwks": "http://evil"}))
    assert e.getall("X-authentik-meta-jwks") == [prov["oidc_configuration"]["jwks_uri"]]


def test_logout_signature_on_any_url(nginx, authentik, upstream, tmp_path):
    prov = start_app(nginx, authentik, tmp_path, upstream)
    b = Browser()
    b.login(host_url(nginx, f"app.{DOMAIN}", "/"), "alice")
    cookie = b.cookie(session_cookie_name(prov["client_id"]))
    assert cookie
    r = b.get(host_url(nginx, f"app.{DOMAIN}", "/some/page?x=1&X-authentik-logout=true"), follow=False)
    assert r.status_code == 302, (r.status_code, r.headers)
    assert "/end-session/" in r.headers["Location"], r.headers["Location"]
    name = session_cookie_name(prov["client_id"])
    r = fresh_get(host_url(nginx, f"app.{DOMAIN}", "/api"), cookies={name: cookie},
                  headers={"Accept": "application/json", "Sec-Fetch-Mode": "cors"})
    assert r.status_code == 401, "the session outlived the logout signature"


# --- rules and metrics with header authentication and the outpost -------------------------------
def test_rules_and_metrics_with_header_auth_and_the_outpost(nginx, authentik, upstream, tmp_path):
    """authentik_require on header-auth requests (a plain 403, not the page), and the metrics of
    an outpost provider: header-auth outcomes, the outpost's sync gauges."""
    from prometheus_client.parser import text_string_to_metric_families
    prov = authentik.add_provider("App", "app", ext_host(nginx, f"app.{DOMAIN}"))
    token_file = authentik.write_token_file(tmp_path / "token")
    nginx.start(f"""
authentik_session_zone zone=authentik:8m;
authentik_outpost {authentik.origin} token_file={token_file};
server {{
    listen 127.0.0.1:@PORT@;
    server_name app.{DOMAIN};
    location / {{ auth_authentik app; proxy_pass {upstream.url}; }}
    location /admin {{ auth_authentik app; authentik_require group admins; proxy_pass {upstream.url}; }}
    location = /metrics {{ auth_authentik off; authentik_metrics; allow 127.0.0.1; deny all; }}
}}""")
    wait_served(nginx, f"app.{DOMAIN}")
    authentik.wait_websocket(lambda v: any(c["connected"] for c in v["connections"]), what="websocket")
    alice = app_token(authentik, prov, "alice")["access_token"]
    bob = app_token(authentik, prov, "bob")["access_token"]
    assert echo(get(nginx, "/admin/x", headers=bearer(alice))).get("X-authentik-username") == "alice"
    r = get(nginx, "/admin/x", headers={**bearer(bob), "Accept": "text/html"})
    assert r.status_code == 403, r.status_code
    assert "Sign out" not in r.text                       # a plain 403 for an API client
    assert get(nginx, "/x", headers=bearer(bob)).status_code == 200

    def scrape():
        text = fresh_get(host_url(nginx, f"app.{DOMAIN}", "/metrics")).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    samples = eventually(lambda: (lambda m: m if any(k[0] == "authentik_outpost_generation" for k in m) else None)(
        scrape()), 5, "outpost gauges in the metrics")
    value = {k[0]: v for k, v in samples.items() if not k[1]}
    assert value["authentik_outpost_generation"] >= 1
    assert value["authentik_outpost_websocket_connected"] == 1
    assert abs(value["authentik_outpost_last_sync_timestamp_seconds"] - time.time()) < 120
    header_ok = [v for (name, labels), v in samples.items()
                 if name.startswith("authentik_requests") and ("outcome", "header_auth") in labels
                 and ("provider", "App") in labels]
    assert header_ok and header_ok[0] == 2, [(k, v) for k, v in samples.items() if k[0].startswith("authentik_requests")]


def test_concurrent_requests_with_one_new_token_make_one_call_per_worker(nginx, authentik, upstream, tmp_path):
    """Many requests at once with a token not cached yet (a cache entry that just expired, on a
    busy API): one provider call per worker, the others wait for it; none gets a 503."""
    import concurrent.futures
    prov = start_app(nginx, authentik, tmp_path, upstream, workers=2)
    token = app_token(authentik, prov)["access_token"]
    authentik.faults(api_stall_ms=0)
    authentik.oauth_calls(reset=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=48) as pool:
        statuses = list(pool.map(lambda _: get(nginx, headers=bearer(token)).status_code, range(96)))
    assert statuses == [200] * 96, sorted(set(statuses))
    assert 1 <= len(introspections(authentik)) <= 2, introspections(authentik)
