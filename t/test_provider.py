"""The test identity provider and upstream on their own (no nginx): the harness's
ground truth.  The test process plays the relying party here, as the module will."""

import base64
import hashlib
import json
import os
import threading
import time
import urllib.parse

import requests
import websocket

from harness import Browser, free_port, is_login_form, query_of, sub_for


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_parts(token: str):
    h, p, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(p)))


def rp_login(provider, client, user="alice", browser=None):
    """Authorization code + PKCE as a relying party; returns (browser, token response)."""
    disc = provider.discovery()
    origin = client["redirect_uris"][0].split("/outpost.goauthentik.io")[0]
    verifier = b64url(os.urandom(32))
    state, nonce = b64url(os.urandom(16)), b64url(os.urandom(16))
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": client["redirect_uris"][0],
        "scope": "openid profile email entitlements ak_proxy",
        "state": state,
        "nonce": nonce,
        "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
        "code_challenge_method": "S256",
    }
    b = browser or Browser()
    url = disc["authorization_endpoint"] + "?" + urllib.parse.urlencode(params)
    stop = lambda r: r.headers["Location"].startswith(origin)  # noqa: E731
    r = b.get(url, stop=stop)
    if is_login_form(r):
        r = b.submit_login(r, user, stop=stop)
    assert r.status_code in (302, 303), (r.status_code, r.text[:300], b.hops)
    q = query_of(r.headers["Location"])
    assert q["state"] == state, q
    assert q.get("iss") == provider.issuer
    data = {"grant_type": "authorization_code", "code": q["code"], "redirect_uri": params["redirect_uri"],
            "code_verifier": verifier}
    if client["token_endpoint_auth_method"] == "client_secret_post":
        data.update(client_id=client["client_id"], client_secret=client["client_secret"])
        auth = None
    else:
        auth = (client["client_id"], client["client_secret"])
    tr = requests.post(disc["token_endpoint"], data=data, auth=auth, timeout=10)
    assert tr.status_code == 200, tr.text
    tokens = tr.json()
    _, idt = jwt_parts(tokens["id_token"])
    assert idt["nonce"] == nonce
    return b, tokens


def test_discovery(provider):
    d = provider.discovery()
    assert d["issuer"] == provider.issuer
    assert d["issuer"] == f"http://127.0.0.1:{provider.port}"
    for ep in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri", "end_session_endpoint"):
        assert d[ep].startswith(provider.issuer_base + "/"), ep
    assert "S256" in d["code_challenge_methods_supported"]
    assert {"openid", "profile", "email", "entitlements", "ak_proxy"} <= set(d["scopes_supported"])
    assert {"RS256", "HS256"} <= set(d["id_token_signing_alg_values_supported"])
    jwks = requests.get(d["jwks_uri"], timeout=5).json()
    assert jwks["keys"] and jwks["keys"][0]["kty"] == "RSA"


def test_rs256_basic_client_and_userinfo(provider):
    client = provider.new_client("http://127.0.0.1:9", alg="RS256", auth="client_secret_basic")
    b, tokens = rp_login(provider, client)
    hdr, idt = jwt_parts(tokens["id_token"])
    assert hdr["alg"] == "RS256"
    assert idt["sub"] == sub_for("alice")
    # profile/email claims are userinfo-only in the code flow
    assert "email" not in idt and "groups" not in idt and "name" not in idt
    assert tokens["expires_in"] > 3000
    ui = requests.get(provider.discovery()["userinfo_endpoint"],
                      headers={"Authorization": "Bearer " + tokens["access_token"]}, timeout=5).json()
    assert ui["sub"] == sub_for("alice")
    assert ui["preferred_username"] == "alice"
    assert ui["groups"] == ["admins", "users"]
    assert ui["entitlements"] == ["app-read", "app-write"]
    assert ui["email"] == "alice@example.test"
    assert ui["ak_proxy"]["user_attributes"]["additionalHeaders"] == {"X-Custom-Team": "blue"}
    # second login in the same browser: SSO, no form
    b2, tokens2 = rp_login(provider, client, browser=b)
    assert tokens2["access_token"] != tokens["access_token"]
    assert not any("/interaction/" in h.url and h.status == 200 for h in b.hops)


def test_hs256_post_client_short_ttl(provider):
    client = provider.new_client("http://127.0.0.1:9", alg="HS256", auth="client_secret_post", token_ttl=5)
    _, tokens = rp_login(provider, client, user="bob")
    hdr, idt = jwt_parts(tokens["id_token"])
    assert hdr["alg"] == "HS256"
    assert tokens["expires_in"] <= 5
    assert idt["exp"] - idt["iat"] <= 5
    import hmac
    signing_input, sig = tokens["id_token"].rsplit(".", 1)
    expect = b64url(hmac.new(client["client_secret"].encode(), signing_input.encode(), hashlib.sha256).digest())
    assert sig == expect
    log = provider.log()
    assert any(e["path"] == "/token" and e["client_auth"] == "none" for e in log)


def test_wrong_password_and_pkce_required(provider):
    client = provider.new_client("http://127.0.0.1:9")
    b = Browser()
    disc = provider.discovery()
    params = {"response_type": "code", "client_id": client["client_id"], "redirect_uri": client["redirect_uris"][0],
              "scope": "openid", "state": "s", "nonce": "n"}
    stop = lambda r: r.headers["Location"].startswith("http://127.0.0.1:9/")  # noqa: E731
    r = b.get(disc["authorization_endpoint"] + "?" + urllib.parse.urlencode(params), stop=stop)
    # without PKCE the provider refuses (error redirect back to the client)
    assert r.status_code in (302, 303) and "error=invalid_request" in r.headers["Location"], (r.status_code, b.hops)
    params.update(code_challenge=b64url(hashlib.sha256(b"x" * 43).digest()), code_challenge_method="S256")
    r = b.get(disc["authorization_endpoint"] + "?" + urllib.parse.urlencode(params), stop=stop)
    assert is_login_form(r)
    r2 = b.submit_login(r, "alice", "wrong")
    assert r2.status_code == 401 and 'id="login"' in r2.text


def test_end_session(provider):
    client = provider.new_client("http://127.0.0.1:9")
    b, tokens = rp_login(provider, client)
    disc = provider.discovery()
    plr = client["post_logout_redirect_uris"][0]
    r = b.get(disc["end_session_endpoint"] + "?" + urllib.parse.urlencode(
        {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": plr}))
    assert r.status_code == 200
    r = b.submit_form(r, stop=lambda r: r.headers["Location"].startswith(plr))
    assert r.status_code in (302, 303) and r.headers["Location"] == plr, (r.status_code, b.hops)


def test_stall_token(provider):
    client = provider.new_client("http://127.0.0.1:9")
    provider.stall_token(1500, count=1)
    t0 = time.monotonic()
    rp_login(provider, client)
    assert time.monotonic() - t0 >= 1.4
    provider.reset()


def test_upstream_echo(upstream):
    r = requests.get(f"{upstream.url}/a/b?x=1&y=%20", headers={"X-Mixed-Case": "1", "x_under": "2"}, timeout=5)
    data = r.json()
    assert data["method"] == "GET" and data["path"] == "/a/b" and data["query"] == "x=1&y=%20"
    assert ["X-Mixed-Case", "1"] in data["headers"] and ["x_under", "2"] in data["headers"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{upstream.port}/ws", timeout=5)
    try:
        hello = json.loads(ws.recv())
        assert hello["type"] == "hello" and hello["path"] == "/ws"
        ws.send("ping-1")
        assert ws.recv() == "ping-1"
    finally:
        ws.close()


def test_path_issuer(make_provider):
    # an authentik-like issuer with a path (and a trailing slash)
    fp = free_port()
    q = make_provider(port=fp, issuer=f"http://127.0.0.1:{fp}/application/o/app/")
    d = q.discovery()
    assert d["issuer"] == f"http://127.0.0.1:{fp}/application/o/app/"
    assert d["authorization_endpoint"].startswith(f"http://127.0.0.1:{fp}/application/o/app/")
    client = q.new_client("http://127.0.0.1:9")
    rp_login(q, client)


def test_concurrent_control(provider):
    # control endpoints answer while a token request is stalled
    provider.stall_token(2000, count=1)
    client = provider.new_client("http://127.0.0.1:9")
    th = threading.Thread(target=rp_login, args=(provider, client))
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    provider.discovery()
    assert time.monotonic() - t0 < 1.0
    th.join(10)
    provider.reset()


def test_two_interleaved_logins_one_browser(provider):
    """Two authorization requests from one browser, both at the login form; the second
    is completed first (what test_login.test_two_tabs relies on)."""
    client = provider.new_client("http://127.0.0.1:9")
    disc = provider.discovery()
    b = Browser()
    stop = lambda r: r.headers["Location"].startswith("http://127.0.0.1:9/")  # noqa: E731

    def authorize(state):
        params = {"response_type": "code", "client_id": client["client_id"],
                  "redirect_uri": client["redirect_uris"][0], "scope": "openid profile", "state": state,
                  "nonce": "n" + state, "code_challenge": b64url(hashlib.sha256(b"v" * 43).digest()),
                  "code_challenge_method": "S256"}
        return b.get(disc["authorization_endpoint"] + "?" + urllib.parse.urlencode(params), stop=stop)

    f1, f2 = authorize("one"), authorize("two")
    assert is_login_form(f1) and is_login_form(f2)
    r2 = b.submit_login(f2, "alice", stop=stop)
    assert query_of(r2.headers["Location"])["state"] == "two", b.hops
    r1 = b.submit_login(f1, "alice", stop=stop)
    assert query_of(r1.headers["Location"])["state"] == "one", b.hops
    assert "code" in query_of(r1.headers["Location"])
