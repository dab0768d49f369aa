"""The authentik emulator alone (no nginx): its fidelity to authentik is checked, not assumed.

Every API answer it serves is parsed with the models of the official `authentik-client`
package (pinned in requirements.txt) twice: through the generated `from_json` and through
pydantic's strict JSON validation; and the keys it serves are compared with the models'
fields, recursively, so a missing, extra or mistyped field fails.  Then the values are
compared with what the test configured.  The websocket, the OAuth2 endpoints and
authentik's proxy-provider token format (HS256 keyed with the client secret, no kid,
claims in both tokens) are exercised as an outpost and a browser would.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import typing
import urllib.parse
import uuid

import importlib
import importlib.util
import sys
import types

import pytest
import requests
import websocket
from pydantic import BaseModel

from harness import Authentik, Browser, is_login_form, query_of, sub_for


def _client_models(**wanted):
    """The official client's model classes, {class name: module name}.

    authentik_client/__init__.py (and models/__init__.py) import every API and ~1500 models:
    ~10 s per process.  Unless the package is already imported, the two packages are
    registered as bare namespaces (their real __path__, without running __init__) and only
    the model modules needed here are imported, with their own imports: the very same
    classes and validation, in a fraction of a second."""
    for name in ("authentik_client", "authentik_client.models"):
        if name not in sys.modules:
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ImportError(f"{name} is not installed (t/requirements.txt pins authentik-client)")
            mod = types.ModuleType(name)
            mod.__path__ = list(spec.submodule_search_locations)
            mod.__spec__ = spec
            sys.modules[name] = mod
    return tuple(getattr(importlib.import_module(f"authentik_client.models.{module}"), cls)
                 for cls, module in wanted.items())


(Config, Event, OpenIDConnectConfiguration, Outpost, OutpostHealth, PaginatedOutpostList,
 PaginatedProxyOutpostConfigList, Pagination) = _client_models(
    Config="config", Event="event", OpenIDConnectConfiguration="open_id_connect_configuration",
    Outpost="outpost", OutpostHealth="outpost_health", PaginatedOutpostList="paginated_outpost_list",
    PaginatedProxyOutpostConfigList="paginated_proxy_outpost_config_list", Pagination="pagination")

# models whose served dict may carry more keys than the OpenAPI schema lists: authentik embeds
# ProviderInfoView.get_info() (the whole discovery document) as oidc_configuration.
OPEN_MODELS = {OpenIDConnectConfiguration}


# --- strict parsing -----------------------------------------------------------------------
def _model_of(annotation):
    """(model class, is_list) for a field annotation, or (None, False)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _model_of(non_none[0])
        return None, False
    if origin in (list, typing.List) and args:
        m, _ = _model_of(args[0])
        return m, m is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def check_keys(model: type[BaseModel], data: dict, where: str = ""):
    """The served dict has exactly the model's fields (a superset for OPEN_MODELS), every
    required one non-null; nested models are checked the same way."""
    where = where or model.__name__
    assert isinstance(data, dict), f"{where}: not an object: {data!r}"
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    missing = set(fields) - set(data)
    assert not missing, f"{where}: fields missing: {sorted(missing)}"
    if model not in OPEN_MODELS:
        extra = set(data) - set(fields)
        assert not extra, f"{where}: fields authentik does not serve: {sorted(extra)}"
    for key, f in fields.items():
        value = data[key]
        optional = type(None) in typing.get_args(f.annotation)
        assert value is not None or optional, f"{where}.{key}: null for a non-nullable field"
        sub, is_list = _model_of(f.annotation)
        if sub is None or value is None:
            continue
        if is_list:
            assert isinstance(value, list), f"{where}.{key}: not a list"
            for i, item in enumerate(value):
                check_keys(sub, item, f"{where}.{key}[{i}]")
        else:
            check_keys(sub, value, f"{where}.{key}")


def parse(model: type[BaseModel], text: str):
    """Parse a served JSON body with the client's model, strictly; returns (model, dict)."""
    data = json.loads(text)
    check_keys(model, data)
    obj = model.from_json(text)
    assert obj is not None
    strict = model.model_validate_json(text, strict=True)
    assert strict == obj
    return obj, data


# --- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ak_module(tmp_path_factory):
    a = Authentik(tmp_path_factory.mktemp("authentik"))
    a.start()
    yield a
    a.stop()


@pytest.fixture
def ak(ak_module):
    ak_module.reset()
    yield ak_module
    if not ak_module.alive():
        ak_module.start()


def ext(name: str, port: int = 8080) -> str:
    return f"http://{name}.authentik.test:{port}"


def callback(external_host: str) -> str:
    return urllib.parse.urljoin(external_host, "outpost.goauthentik.io/callback") + "?X-authentik-auth-callback=true"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_parts(token: str):
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return (json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(p))),
            base64.urlsafe_b64decode(pad(s)), f"{h}.{p}")


def verify_hs256(token: str, key: str) -> dict:
    header, claims, sig, signed = jwt_parts(token)
    assert header == {"alg": "HS256", "typ": "JWT"}, header  # no kid
    want = hmac.new(key.encode(), signed.encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(sig, want), "bad HS256 signature"
    return claims


def pkce():
    verifier = secrets.token_urlsafe(48)
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


def stop_at(prefix: str):
    return lambda r: r.headers.get("Location", "").startswith(prefix)


def login(ak, prov: dict, user: str = "alice", browser: Browser | None = None, nonce: str | None = "n-0S6_WzA2Mj",
          scope: str | None = None, host: str | None = None):
    """Drive authorize -> login form -> redirect to the callback; returns (browser, code, params)."""
    b = browser or Browser()
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(16)
    q = {"client_id": prov["client_id"], "redirect_uri": callback(prov["external_host"]), "response_type": "code",
         "scope": scope or " ".join(prov["scopes_to_request"]), "state": state, "code_challenge": challenge,
         "code_challenge_method": "S256"}
    if nonce:
        q["nonce"] = nonce
    url = ak.url("/application/o/authorize/", host) + "?" + urllib.parse.urlencode(q)
    cb = callback(prov["external_host"])
    r = b.get(url, stop=stop_at(cb))
    if is_login_form(r):
        r = b.submit_login(r, user, stop=stop_at(cb))
    assert r.status_code == 302, (r.status_code, r.text[:300], b.hops)
    loc = r.headers["Location"]
    assert loc.startswith(cb + "&"), loc
    got = query_of(loc)
    assert got["state"] == state
    return b, got["code"], {"verifier": verifier, "redirect_uri": cb, "nonce": nonce}


def redeem(ak, prov, code, verifier, redirect_uri=None, basic=False, host=None, **extra):
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri or callback(
        prov["external_host"]), "code_verifier": verifier, **extra}
    headers = {}
    if host:
        headers["Host"] = host
    if basic:
        cred = f"{urllib.parse.quote(prov['client_id'])}:{urllib.parse.quote(prov['client_secret'])}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    else:
        form.setdefault("client_id", prov["client_id"])
        form.setdefault("client_secret", prov["client_secret"])
    return requests.post(ak.url("/application/o/token/"), data=form, headers=headers, timeout=10)


def ws_connect(ak, token=None, pk=None, instance=None, attempt=1, timeout=5):
    pk = pk or ak.outpost()["pk"]
    instance = instance or str(uuid.uuid4())
    url = f"ws://127.0.0.1:{ak.port}/ws/outpost/{pk}/?instance_uuid={instance}&attempt={attempt}"
    ws = websocket.create_connection(url, timeout=timeout, header=[
        f"Authorization: Bearer {ak.token if token is None else token}", "User-Agent: goauthentik.io/outpost/test"])
    return ws, instance


def hello(ws, instance, version="2026.8.5"):
    ws.send(json.dumps({"instruction": 1, "args": {"version": version, "buildHash": "abc", "uuid": instance,
                                                   "hostname": "testhost"}}))


def recv_json(ws):
    return json.loads(ws.recv())


# --- the outpost API ------------------------------------------------------------------------
def test_outpost_instances(ak):
    made = ak.add_providers([{"name": f"app-{i}", "external_host": ext(f"app{i}")} for i in range(3)])
    ak.set_outpost(config={"refresh_interval": "minutes=1;seconds=30"})
    r = ak.api("outposts/instances/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    obj, data = parse(PaginatedOutpostList, r.text)
    assert data["autocomplete"] == {}
    assert obj.pagination == Pagination(next=0, previous=0, count=1, current=1, total_pages=1, start_index=1,
                                        end_index=1)
    assert len(obj.results) == 1
    o = obj.results[0]
    assert o.name == "nginx outpost" and o.type.value == "proxy"
    assert o.providers == [p["pk"] for p in made]
    assert [p.name for p in o.providers_obj] == ["app-0", "app-1", "app-2"]
    assert [p.assigned_application_slug for p in o.providers_obj] == ["app-0", "app-1", "app-2"]
    assert o.refresh_interval_s == 90
    assert o.token_identifier == f"ak-outpost-{o.pk}-api"
    assert o.managed is None and o.service_connection is None and o.service_connection_obj is None
    cfg = o.config
    for key in ("authentik_host", "authentik_host_insecure", "authentik_host_browser", "log_level",
                "refresh_interval", "object_naming_template"):
        assert key in cfg, key
    assert cfg["authentik_host"] == ak.origin + "/"
    assert cfg["refresh_interval"] == "minutes=1;seconds=30"
    # one object, by pk, and a page past the end
    one, _ = parse(Outpost, ak.api(f"outposts/instances/{o.pk}/").text)
    assert one == o
    assert ak.api("outposts/instances/", params={"page": 2}).status_code == 404
    assert ak.api(f"outposts/instances/{uuid.uuid4()}/").status_code == 404


def test_proxy_providers_pagination_and_values(ak):
    wanted = []
    for i in range(105):
        p = {"name": f"prov-{i:03d}", "slug": f"slug-{i:03d}", "external_host": ext(f"a{i}"),
             "app_name": f"App {i}"}
        if i % 3 == 1:
            p.update(mode="forward_single")
        elif i % 3 == 2:
            p.update(mode="forward_domain", cookie_domain="authentik.test", external_host=ext("auth"))
        if i % 10 == 0:
            p.update(global_issuer=True)
        if i % 7 == 0:
            p.update(skip_path_regex="^/public/.*\n^/health$", access_token_validity="minutes=5",
                     intercept_header_auth=False, basic_auth_enabled=True, basic_auth_user_attribute="user",
                     basic_auth_password_attribute="pw", internal_host="http://10.0.0.1:3000",
                     internal_host_ssl_validation=False)
        if i == 42:
            p["scope_claims"] = {"backend_override": {"ak_proxy": {"backend_override": "http://127.0.0.1:9"}}}
        if i == 43:
            p["certificate"] = str(uuid.uuid4())
        wanted.append(p)
    # created out of name order: the API orders by name
    ak.add_providers(list(reversed(wanted)))
    by_name = {p["name"]: p for p in wanted}
    internal = {p["name"]: p for p in ak.providers()}

    pages = []
    for page in (1, 2):
        r = ak.api("outposts/proxy/", params={"page": page, "page_size": 100})
        assert r.status_code == 200
        obj, _ = parse(PaginatedProxyOutpostConfigList, r.text)
        pages.append(obj)
    assert pages[0].pagination == Pagination(next=2, previous=0, count=105, current=1, total_pages=2,
                                             start_index=1, end_index=100)
    assert pages[1].pagination == Pagination(next=0, previous=1, count=105, current=2, total_pages=2,
                                             start_index=101, end_index=105)
    assert ak.api("outposts/proxy/", params={"page": 3, "page_size": 100}).status_code == 404
    results = pages[0].results + pages[1].results
    assert [c.name for c in results] == sorted(by_name)

    origin = ak.origin
    for c in results:
        w, rec = by_name[c.name], internal[c.name]
        assert c.pk == rec["pk"]
        assert c.external_host == w["external_host"]
        assert c.internal_host == w.get("internal_host", "http://127.0.0.1:1")
        assert c.internal_host_ssl_validation is w.get("internal_host_ssl_validation", True)
        assert c.mode.value == w.get("mode", "proxy")
        assert c.cookie_domain == w.get("cookie_domain", "")
        assert c.skip_path_regex == w.get("skip_path_regex", "")
        assert c.intercept_header_auth is w.get("intercept_header_auth", True)
        assert c.basic_auth_enabled is w.get("basic_auth_enabled", False)
        assert c.basic_auth_user_attribute == w.get("basic_auth_user_attribute", "")
        assert c.basic_auth_password_attribute == w.get("basic_auth_password_attribute", "")
        assert c.access_token_validity == (300.0 if "access_token_validity" in w else 86400.0)
        assert isinstance(c.access_token_validity, float)
        assert c.assigned_application_slug == w["slug"] and c.assigned_application_name == w["app_name"]
        assert (str(c.certificate) if c.certificate else None) == w.get("certificate")
        want_scopes = {"openid", "profile", "email", "entitlements", "ak_proxy"} | set(w.get("scope_claims", {}))
        assert set(c.scopes_to_request) == want_scopes
        assert len(c.client_id) == 40 and c.client_id == rec["client_id"]
        assert len(c.client_secret) == 128 and c.client_secret == rec["client_secret"]
        assert re.fullmatch(r"[A-Z0-9]{32}", c.cookie_secret), c.cookie_secret
        oc = c.oidc_configuration
        issuer = f"{origin}/" if w.get("global_issuer") else f"{origin}/application/o/{w['slug']}/"
        assert oc.issuer == issuer
        assert oc.authorization_endpoint == f"{origin}/application/o/authorize/"
        assert oc.token_endpoint == f"{origin}/application/o/token/"
        assert oc.userinfo_endpoint == f"{origin}/application/o/userinfo/"
        assert oc.introspection_endpoint == f"{origin}/application/o/introspect/"
        assert oc.end_session_endpoint == f"{origin}/application/o/{w['slug']}/end-session/"
        assert oc.jwks_uri == f"{origin}/application/o/{w['slug']}/jwks/"
        assert oc.id_token_signing_alg_values_supported == ["HS256"]
        assert "code" in oc.response_types_supported
        assert oc.subject_types_supported == ["public"]
        assert set(oc.token_endpoint_auth_methods_supported) == {"client_secret_post", "client_secret_basic"}
    # the helper that pages like an outpost sees the same
    assert [p["name"] for p in ak.served_providers()] == sorted(by_name)


def test_urls_follow_the_request_host(ak):
    ak.add_provider("app", "app", ext("app"))
    ak.add_provider("glob", "glob", ext("glob"), global_issuer=True)
    host = f"auth.authentik.test:{ak.port}"
    for headers, base in (({"Host": host}, f"http://{host}"),
                          ({"Host": host, "X-Forwarded-Proto": "https"}, f"https://{host}")):
        r = ak.api("outposts/proxy/", headers=headers)
        obj, _ = parse(PaginatedProxyOutpostConfigList, r.text)
        c = {x.name: x for x in obj.results}
        assert c["app"].oidc_configuration.issuer == f"{base}/application/o/app/"
        assert c["glob"].oidc_configuration.issuer == f"{base}/"
        assert c["app"].oidc_configuration.authorization_endpoint == f"{base}/application/o/authorize/"
        d = requests.get(ak.url("/application/o/glob/.well-known/openid-configuration"), headers=headers,
                         timeout=10)
        disc, _ = parse(OpenIDConnectConfiguration, d.text)
        assert disc.issuer == f"{base}/" and disc.token_endpoint == f"{base}/application/o/token/"


def test_api_authentication(ak):
    ak.reset_api_calls()
    cases = [
        ({}, "Authentication credentials were not provided."),
        ({"Authorization": "Bearer wrong"}, "Token invalid/expired"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "Unsupported authentication type"),
        ({"Authorization": "Bearer "}, "Authentication credentials were not provided."),
    ]
    for headers, detail in cases:
        for path in ("outposts/instances/", "outposts/proxy/", "root/config/"):
            r = requests.get(f"{ak.origin}/api/v3/{path}", headers=headers, timeout=10)
            assert r.status_code == 403, (headers, path, r.status_code)
            assert r.json() == {"detail": detail}, (headers, r.text)
    assert ak.api("outposts/proxy/").status_code == 200
    ak.set_token("new-token")
    assert ak.api("outposts/proxy/").status_code == 200
    assert ak.api("outposts/proxy/", token="nginx-authentik-test-token").status_code == 403
    calls = ak.api_calls()
    assert calls["by_path"]["/api/v3/outposts/proxy/"] == 4 * 1 + 3
    assert calls["total"] == 4 * 3 + 3
    # every call is attributed to this process (the client end of the loopback connection)
    assert set(calls["by_pid"]) == {str(os.getpid())}, calls["by_pid"]
    assert {c["user_agent"] for c in calls["calls"] if c["status"] == 200} == {"goauthentik.io/outpost/test"}
    assert ak.api_calls(reset=True)["total"] == calls["total"]
    assert ak.api_calls()["total"] == 0


def test_root_config_and_events(ak):
    parse(Config, ak.api("root/config/").text)
    body = {"action": "configuration_error", "app": "authentik.providers.proxy", "client_ip": "127.0.0.1",
            "context": {"message": "no X-Original-URI", "provider": "app", "outpost": "nginx"}}
    r = requests.post(f"{ak.origin}/api/v3/events/events/", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {ak.token}"})
    assert r.status_code == 201
    ev, _ = parse(Event, r.text)
    assert ev.action.value == "configuration_error" and ev.context["provider"] == "app"
    assert ak.events()[0]["context"] == body["context"]


# --- the websocket ---------------------------------------------------------------------------
def test_websocket_hello_ack_and_health(ak):
    ws, inst = ws_connect(ak, attempt=3)
    try:
        hello(ws, inst)
        assert recv_json(ws) == {"instruction": 0, "args": {}}
        # any non-ACK message is ACKed; ACKs are not
        ws.send(json.dumps({"instruction": 0, "args": {}}))
        ws.send(json.dumps({"instruction": 3, "args": {"x": 1}}))
        assert recv_json(ws) == {"instruction": 0, "args": {}}
        # like authentik, a message without hostname blanks the recorded hostname until the next HELLO
        hello(ws, inst)
        assert recv_json(ws) == {"instruction": 0, "args": {}}
        view = ak.wait_websocket(lambda v: any(c["instance_uuid"] == inst and c["messages"] == 3
                                               for c in v["connections"]))
        c = [c for c in view["connections"] if c["instance_uuid"] == inst][0]
        assert c["connected"] and c["attempt"] == "3" and c["hello_count"] == 2
        assert c["last_hello"]["hostname"] == "testhost" and c["last_hello"]["version"] == "2026.8.5"
        assert c["pid"] == os.getpid()
        assert view["healthy"]
        pk = ak.outpost()["pk"]
        r = ak.api(f"outposts/instances/{pk}/health/")
        data = r.json()
        assert isinstance(data, list) and len(data) == 1
        check_keys(OutpostHealth, data[0])
        h = OutpostHealth.from_dict(data[0])
        OutpostHealth.model_validate_json(json.dumps(data[0]), strict=True)
        assert h.uid == inst and h.hostname == "testhost" and h.version == "2026.8.5"
        assert h.version_outdated is False
    finally:
        ws.close()
    ak.wait_websocket(lambda v: not any(c["connected"] for c in v["connections"] if c["instance_uuid"] == inst))


def test_websocket_rejections(ak):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        ws_connect(ak, token="wrong")
    assert e.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        ws_connect(ak, pk=str(uuid.uuid4()))
    assert e.value.status_code == 403
    view = ak.websockets()
    assert {c["rejected"] for c in view["connections"][-2:]} == {"token", "pk"}


def test_websocket_pushes(ak):
    ws, inst = ws_connect(ak)
    try:
        hello(ws, inst)
        assert recv_json(ws)["instruction"] == 0
        assert ak.trigger_update() >= 1
        assert recv_json(ws) == {"instruction": 2, "args": {}}
        ak.add_provider("app", "app", ext("app"), notify=True)
        assert recv_json(ws) == {"instruction": 2, "args": {}}
        ak.update_provider("app", skip_path_regex="^/x", notify=True)
        assert recv_json(ws) == {"instruction": 2, "args": {}}
        ak.update_provider("app", skip_path_regex="^/y")  # no notify: nothing sent
        ak.remove_provider("app", notify=True)
        assert recv_json(ws) == {"instruction": 2, "args": {}}
        # SESSION_END after a login and session_end(username)
        prov = ak.add_provider("app2", "app2", ext("app2"))
        b, code, extra = login(ak, prov, "bob")
        key = b.cookie("authentik_session")
        assert key
        out = ak.session_end(username="bob")
        sid = hashlib.sha256(key.encode()).hexdigest()
        assert out["ended"] == [sid] and out["notified"] >= 1
        assert recv_json(ws) == {"instruction": 4, "args": {"type": "event.session.end", "session_id": sid}}
        assert ak.sessions() == []
        # a code of an ended session cannot be redeemed
        assert redeem(ak, prov, code, extra["verifier"]).json()["error"] == "invalid_grant"
        # by session id (sid or key), and an unknown id is still broadcast
        ak.session_end(session_id="f" * 64)
        assert recv_json(ws)["args"]["session_id"] == "f" * 64
        # drop: the client sees the connection end
        assert ak.drop_websockets() >= 1
        ws.settimeout(5)
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            while True:
                if ws.recv() in ("", b""):
                    raise websocket.WebSocketConnectionClosedException("closed")
    finally:
        ws.close()
    ak.wait_websocket(lambda v: v["connected"] == 0)


def test_drop_websockets_abort(ak):
    ws, inst = ws_connect(ak)
    try:
        hello(ws, inst)
        recv_json(ws)
        assert ak.drop_websockets(abort=True) == 1
        ws.settimeout(5)
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            while True:
                if ws.recv() in ("", b""):
                    raise websocket.WebSocketConnectionClosedException("closed")
    finally:
        ws.close()


# --- OAuth2 / OIDC and the token format ---------------------------------------------------------
def test_discovery_and_jwks(ak):
    ak.add_provider("app", "app", ext("app"))
    ak.add_provider("glob", "glob-slug", ext("glob"), global_issuer=True)
    for slug, issuer in (("app", f"{ak.origin}/application/o/app/"), ("glob-slug", f"{ak.origin}/")):
        r = requests.get(ak.url(f"/application/o/{slug}/.well-known/openid-configuration"), timeout=10)
        assert r.status_code == 200
        d, raw = parse(OpenIDConnectConfiguration, r.text)
        assert d.issuer == issuer
        assert d.end_session_endpoint == f"{ak.origin}/application/o/{slug}/end-session/"
        assert d.id_token_signing_alg_values_supported == ["HS256"]
        assert "S256" in raw["code_challenge_methods_supported"]
        assert set(raw["scopes_supported"]) == {"openid", "profile", "email", "entitlements", "ak_proxy"}
        assert requests.get(d.jwks_uri, timeout=10).json() == {"keys": []}
    assert requests.get(ak.url("/application/o/nope/.well-known/openid-configuration"), timeout=10).status_code == 404


def test_full_code_flow_and_token_format(ak):
    prov = ak.add_provider("app", "app", ext("app"), access_token_validity="hours=2")
    b, code, extra = login(ak, prov, "alice")
    key = b.cookie("authentik_session")
    assert key and len(key) >= 32
    t0 = int(time.time())
    r = redeem(ak, prov, code, extra["verifier"])
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    tok = r.json()
    assert set(tok) == {"access_token", "token_type", "scope", "expires_in", "id_token"}
    assert tok["token_type"] == "Bearer" and tok["expires_in"] == 7200
    assert set(tok["scope"].split()) == {"openid", "profile", "email", "entitlements", "ak_proxy"}
    idt = verify_hs256(tok["id_token"], prov["client_secret"])
    at = verify_hs256(tok["access_token"], prov["client_secret"])
    for c in (idt, at):
        assert c["iss"] == f"{ak.origin}/application/o/app/"
        assert c["sub"] == sub_for("alice")
        assert c["aud"] == prov["client_id"]
        assert c["exp"] - c["iat"] == 7200 and abs(c["iat"] - t0) <= 2
        assert abs(c["auth_time"] - t0) <= 5
        assert c["acr"] == "goauthentik.io/providers/oauth2/default" and c["amr"] == ["pwd"]
        assert c["nonce"] == extra["nonce"]
        assert c["sid"] == hashlib.sha256(key.encode()).hexdigest()
        assert re.fullmatch(r"[0-9a-f]{32}", c["jti"])
        assert c["name"] == "Alice Liddell" and c["given_name"] == "Alice Liddell"
        assert c["preferred_username"] == "alice" and c["nickname"] == "alice"
        assert c["groups"] == ["admins", "users"]
        assert c["email"] == "alice@example.test" and c["email_verified"] is True
        assert c["entitlements"] == ["app-read", "app-write"] and c["roles"] == ["app-read", "app-write"]
        assert c["ak_proxy"] == {"user_attributes": {"additionalHeaders": {"X-Custom-Team": "blue"}},
                                 "is_superuser": True}
    assert "azp" not in idt and "uid" not in idt
    assert at["azp"] == prov["client_id"] and at["uid"] and at["scope"] == tok["scope"]
    assert at["jti"] != idt["jti"]
    # a wrong key does not verify
    with pytest.raises(AssertionError):
        verify_hs256(tok["access_token"], prov["client_secret"][:-1] + "x")
    # the code is one-use
    again = redeem(ak, prov, code, extra["verifier"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # a second authorize with the emulator session skips the login form
    b2, code2, extra2 = login(ak, prov, browser=b, nonce=None)
    assert not any("/interaction/" in h.url for h in b2.hops), b2.hops
    tok2 = redeem(ak, prov, code2, extra2["verifier"], basic=True).json()
    c2 = verify_hs256(tok2["id_token"], prov["client_secret"])
    assert "nonce" not in c2 and c2["sid"] == idt["sid"]
    # userinfo and introspection
    ui = requests.get(ak.url("/application/o/userinfo/"), headers={"Authorization": "Bearer " + tok["access_token"]},
                      timeout=10)
    assert ui.status_code == 200 and ui.json()["sub"] == sub_for("alice") and ui.json()["groups"] == ["admins", "users"]
    assert requests.get(ak.url("/application/o/userinfo/"), headers={"Authorization": "Bearer x"},
                        timeout=10).status_code == 401
    intro = requests.post(ak.url("/application/o/introspect/"), timeout=10, data={
        "client_id": prov["client_id"], "client_secret": prov["client_secret"], "token": tok["access_token"]}).json()
    assert intro["active"] is True and intro["client_id"] == prov["client_id"]
    assert intro["scope"] == tok["scope"] and intro["sub"] == sub_for("alice") and intro["sid"] == idt["sid"]


def test_token_issuer_follows_token_request_host(ak):
    prov = ak.add_provider("app", "app", ext("app"))
    glob = ak.add_provider("glob", "glob", ext("glob"), global_issuer=True)
    host = f"auth.authentik.test:{ak.port}"
    for p, issuer in ((prov, f"http://{host}/application/o/app/"), (glob, f"http://{host}/")):
        _, code, extra = login(ak, p, host="auth.authentik.test")
        tok = redeem(ak, p, code, extra["verifier"], host=host).json()
        assert verify_hs256(tok["access_token"], p["client_secret"])["iss"] == issuer


def test_token_errors_and_pkce(ak):
    prov = ak.add_provider("app", "app", ext("app"))
    other = ak.add_provider("other", "other", ext("other"))
    b, code, extra = login(ak, prov)
    v = extra["verifier"]
    cases = [
        (dict(verifier=v[:-1] + ("A" if v[-1] != "A" else "B")), 400, "invalid_grant"),
        (dict(verifier=""), 400, "invalid_grant"),
        (dict(verifier=v, redirect_uri=ext("app") + "/elsewhere?X-authentik-auth-callback=true"), 400,
         "invalid_client"),
        (dict(verifier=v, client_secret="wrong"), 400, "invalid_client"),
        (dict(verifier=v, client_id="nope"), 400, "invalid_client"),
    ]
    for kw, status, error in cases:
        verifier = kw.pop("verifier")
        r = redeem(ak, prov, code, verifier, **kw)
        assert (r.status_code, r.json()["error"]) == (status, error), (kw, r.text)
    # another client cannot redeem this code
    r = redeem(ak, other, code, v)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    # the legacy registered redirect URI is accepted at the token endpoint too (authentik only
    # checks that it is registered); a verifier for a code without PKCE is a downgrade
    _, code_b, extra_b = login(ak, prov, browser=b)
    assert redeem(ak, prov, code_b, extra_b["verifier"],
                  redirect_uri=ext("app") + "?X-authentik-auth-callback=true").status_code == 200
    r = requests.post(ak.url("/application/o/token/"), timeout=10, data={
        "grant_type": "urn:example:unsupported", "client_id": prov["client_id"],
        "client_secret": prov["client_secret"]})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    # failed attempts did not consume the code
    assert redeem(ak, prov, code, v).status_code == 200
    # plain PKCE and no PKCE at all are accepted like authentik does
    for method in ("plain", None):
        q = {"client_id": prov["client_id"], "redirect_uri": callback(prov["external_host"]),
             "response_type": "code", "scope": "openid", "state": "s"}
        if method:
            q.update(code_challenge="verifier-" + "x" * 40, code_challenge_method=method)
        r = b.get(ak.url("/application/o/authorize/") + "?" + urllib.parse.urlencode(q), follow=False)
        assert r.status_code == 302
        c = query_of(r.headers["Location"])["code"]
        if not method:
            assert redeem(ak, prov, c, "some-verifier").json()["error"] == "invalid_grant"  # downgrade
        tok = redeem(ak, prov, c, "verifier-" + "x" * 40 if method else "")
        assert tok.status_code == 200, tok.text
        assert tok.json()["scope"] == "openid"
        claims = verify_hs256(tok.json()["access_token"], prov["client_secret"])
        assert "groups" not in claims and "ak_proxy" not in claims


def test_authorize_errors(ak):
    prov = ak.add_provider("app", "app", ext("app"))
    base = {"client_id": prov["client_id"], "redirect_uri": callback(prov["external_host"]), "response_type": "code",
            "scope": "openid", "state": "st"}

    def get(**over):
        q = {**base, **over}
        q = {k: v for k, v in q.items() if v is not None}
        return requests.get(ak.url("/application/o/authorize/") + "?" + urllib.parse.urlencode(q),
                            allow_redirects=False, timeout=10)

    assert get(client_id="nope").status_code == 400
    assert get(redirect_uri="http://evil.test/cb").status_code == 400
    assert get(redirect_uri=ext("app") + "/other?X-authentik-auth-callback=true").status_code == 400
    # both registered redirect URIs are accepted (the legacy one is external_host + query)
    for uri in (callback(prov["external_host"]), prov["external_host"] + "?X-authentik-auth-callback=true"):
        r = get(redirect_uri=uri)
        assert r.status_code == 302 and "/interaction/" in r.headers["Location"]
    r = get(response_type="token")
    assert r.status_code == 302
    assert query_of(r.headers["Location"]) == {"X-authentik-auth-callback": "true",
                                               "error": "unsupported_response_type", "state": "st"}
    r = get(code_challenge="abc", code_challenge_method="S512")
    assert query_of(r.headers["Location"])["error"] == "invalid_request"
    # the login form rejects a wrong password
    b = Browser()
    r = b.get(ak.origin + get().headers["Location"])
    assert is_login_form(r)
    r2 = b.submit_login(r, "alice", "wrong", follow=False)
    assert r2.status_code == 401 and 'id="login"' in r2.text
    assert b.cookie("authentik_session") is None


def test_custom_scope_claims(ak):
    prov = ak.add_provider("app", "app", ext("app"), scope_claims={
        "backend_override": {"ak_proxy": {"backend_override": "http://127.0.0.1:9", "host_header": "x.test"}}})
    assert "backend_override" in prov["scopes_to_request"]
    _, code, extra = login(ak, prov, "bob")
    claims = verify_hs256(redeem(ak, prov, code, extra["verifier"]).json()["access_token"], prov["client_secret"])
    assert claims["ak_proxy"] == {"user_attributes": {"additionalHeaders": {"X-Custom-Team": "red"}},
                                  "is_superuser": False, "backend_override": "http://127.0.0.1:9",
                                  "host_header": "x.test"}
    # dave's token is big, carol's claims are empty
    _, code, extra = login(ak, prov, "dave")
    claims = verify_hs256(redeem(ak, prov, code, extra["verifier"]).json()["access_token"], prov["client_secret"])
    assert len(claims["groups"]) == 3000
    _, code, extra = login(ak, prov, "carol")
    claims = verify_hs256(redeem(ak, prov, code, extra["verifier"]).json()["access_token"], prov["client_secret"])
    assert claims["preferred_username"] == "carol" and claims["groups"] == [] and claims["email"] == ""


def test_client_credentials_with_app_password(ak):
    prov = ak.add_provider("app", "app", ext("app"))
    ak.app_password("bob", "bob-app-password")
    form = {"grant_type": "client_credentials", "client_id": prov["client_id"], "username": "bob",
            "password": "bob-app-password", "scope": " ".join(prov["scopes_to_request"])}
    r = requests.post(ak.url("/application/o/token/"), data=form, timeout=10)
    assert r.status_code == 200, r.text
    idt = verify_hs256(r.json()["id_token"], prov["client_secret"])
    assert idt["sub"] == sub_for("bob") and idt["preferred_username"] == "bob" and "sid" not in idt
    for bad in ({"password": "bob-password"}, {"username": "alice"}, {"password": ""}):
        r = requests.post(ak.url("/application/o/token/"), data={**form, **bad}, timeout=10)
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant", bad


def test_introspection_rejections(ak):
    prov = ak.add_provider("app", "app", ext("app"))
    other = ak.add_provider("other", "other", ext("other"))
    _, code, extra = login(ak, prov, "alice")
    tok = redeem(ak, prov, code, extra["verifier"]).json()["access_token"]

    def intro(p, token, secret=None):
        return requests.post(ak.url("/application/o/introspect/"), timeout=10, data={
            "client_id": p["client_id"], "client_secret": secret or p["client_secret"], "token": token})

    assert intro(prov, tok).json()["active"] is True
    assert intro(prov, tok, secret="wrong").json() == {"active": False}
    assert intro(other, tok).json() == {"active": False}
    assert intro(prov, "garbage").json() == {"active": False}
    # basic client auth works too
    cred = base64.b64encode(f"{prov['client_id']}:{prov['client_secret']}".encode()).decode()
    r = requests.post(ak.url("/application/o/introspect/"), data={"token": tok}, timeout=10,
                      headers={"Authorization": "Basic " + cred})
    assert r.json()["active"] is True
    ak.session_end(username="alice")
    assert intro(prov, tok).json() == {"active": False}


def test_end_session(ak):
    prov = ak.add_provider("app", "app", ext("app"))
    ws, inst = ws_connect(ak)
    try:
        hello(ws, inst)
        recv_json(ws)
        b, code, _ = login(ak, prov, "alice")
        key = b.cookie("authentik_session")
        r = b.get(ak.url("/application/o/app/end-session/"), params={"post_logout_redirect_uri": "http://x.test/"},
                  follow=False)
        assert r.status_code == 302 and r.headers["Location"] == "http://x.test/"
        msg = recv_json(ws)
        assert msg == {"instruction": 4, "args": {"type": "event.session.end",
                                                   "session_id": hashlib.sha256(key.encode()).hexdigest()}}
        assert ak.sessions() == []
        # the next authorize needs a login again
        r = b.get(ak.url("/application/o/authorize/") + "?" + urllib.parse.urlencode({
            "client_id": prov["client_id"], "redirect_uri": callback(prov["external_host"]),
            "response_type": "code", "scope": "openid"}), follow=False)
        assert "/interaction/" in r.headers["Location"]
        r = b.get(ak.url("/application/o/app/end-session/"))
        assert r.status_code == 200 and "logged out" in r.text
    finally:
        ws.close()


def test_restart_keeps_data(tmp_path):
    a = Authentik(tmp_path / "ak")
    a.start()
    try:
        prov = a.add_provider("app", "app", ext("app"))
        b, code, extra = login(a, prov, "alice")
        pk, port = a.outpost()["pk"], a.port
        a.set_token("rotated")
        a.stop()
        with pytest.raises(requests.ConnectionError):
            requests.get(a.url("/api/v3/outposts/proxy/"), timeout=2)
        a.start()
        assert a.port == port and a.outpost()["pk"] == pk
        assert a.served_providers()[0]["client_secret"] == prov["client_secret"]
        assert a.api("outposts/proxy/", token="nginx-authentik-test-token").status_code == 403
        # the emulator session survived: authorize goes straight back with a code
        _, code2, extra2 = login(a, prov, browser=b)
        assert not any("/interaction/" in h.url for h in b.hops)
        assert redeem(a, prov, code2, extra2["verifier"]).status_code == 200
    finally:
        a.stop()


def test_control_validation(ak):
    with pytest.raises(RuntimeError, match="external_host"):
        ak.add_provider("x", "x", "")
    ak.add_provider("x", "x", ext("x"))
    with pytest.raises(RuntimeError, match="exists"):
        ak.add_provider("x", "y", ext("y"))
    with pytest.raises(RuntimeError, match="taken"):
        ak.add_provider("z", "x", ext("z"))
    with pytest.raises(RuntimeError, match="mode"):
        ak.add_provider("m", "m", ext("m"), mode="forward")
    with pytest.raises(RuntimeError, match="unknown provider fields"):
        ak.add_provider("u", "u", ext("u"), colour="blue")
    with pytest.raises(RuntimeError, match="404"):
        ak.update_provider("nope", mode="proxy")
    # a rename keeps the pk
    before = ak.providers()[0]
    after = ak.update_provider("x", name="renamed")
    assert after["pk"] == before["pk"] and after["name"] == "renamed"
    assert [p["name"] for p in ak.served_providers()] == ["renamed"]
