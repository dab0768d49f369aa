#!/usr/bin/env python3
"""An authentik emulator for nginx-authentik's end-to-end tests.

It speaks what an authentik outpost of type Proxy talks to (see
shared/docs/authentik-outpost-protocol.md, sections b1-b5):

  * the outpost REST API (Bearer token, DRF-style 403s, authentik's pagination envelope):
      GET  /api/v3/outposts/instances/            PaginatedOutpostList (this one outpost)
      GET  /api/v3/outposts/instances/<pk>/       Outpost
      GET  /api/v3/outposts/instances/<pk>/health/  [OutpostHealth] (what authentik's UI shows)
      GET  /api/v3/outposts/proxy/?page=N&page_size=100   PaginatedProxyOutpostConfigList, by name
      GET  /api/v3/root/config/                   Config
      POST /api/v3/events/events/                 Event (configuration_error reports)
  * the outpost websocket /ws/outpost/<pk>/?instance_uuid=..&attempt=.. (JSON
    {"instruction": N, "args": {...}}; HELLO/other non-ACK messages are recorded and ACKed;
    TRIGGER_UPDATE and SESSION_END are pushed from the control endpoints);
  * authentik's OAuth2/OIDC endpoints for every provider, with authentik's proxy-provider
    token format (HS256 keyed with client_secret, no kid, claims in both tokens):
      /application/o/<slug>/.well-known/openid-configuration, /application/o/authorize/,
      /application/o/token/, /application/o/userinfo/, /application/o/introspect/,
      /application/o/revoke/, /application/o/<slug>/end-session/, /application/o/<slug>/jwks/
    with a login page under /interaction/<uid> (form id="login", username/password);
  * control endpoints for the tests under /__control/ (JSON; see CONTROL below).

Every URL the emulator builds (issuer, endpoints) uses the request's Host header and scheme
(X-Forwarded-Proto honoured), as Django's build_absolute_uri does.

Usage:
  authentik_emulator.py --port P [--host 127.0.0.1] [--token TOKEN] [--outpost-name NAME]
                        [--state FILE]
Port 0 picks a free port.  Prints one line `ready http://HOST:PORT/` once listening
(`--cert FILE --key FILE`: https and wss with that certificate, `ready https://...`).
With --state the data (token, outpost, providers, sessions, app passwords) is written to
FILE on every change and read back at start, so a restart on the same port keeps it.

CONTROL (all JSON):
  GET    /__control/providers                  the providers (internal records)
  POST   /__control/providers[?notify=1]       create (object or list of objects):
         {name, slug, external_host, [app_name], [mode], [cookie_domain], [skip_path_regex],
          [internal_host], [global_issuer], [scopes], [scope_claims], [access_token_validity],
          [client_id], [client_secret], [cookie_secret], [intercept_header_auth],
          [basic_auth_enabled, basic_auth_user_attribute, basic_auth_password_attribute],
          [internal_host_ssl_validation], [certificate]}
         -> the ProxyOutpostConfig as served (built for this request's Host)
  PATCH  /__control/providers/<name>[?notify=1]   update fields
  DELETE /__control/providers/<name>[?notify=1]   remove
  POST   /__control/outpost[?notify=1]            {name?, config?: {...}} update the outpost
  POST   /__control/trigger_update                TRIGGER_UPDATE to every websocket
  POST   /__control/session_end                   {username} | {session_id} (sid hash or key)
  POST   /__control/drop_websockets               {"abort": bool} close every websocket
  GET    /__control/api_calls[?reset=1]           every /api/v3 call (path, ua, peer, pid)
  POST   /__control/api_calls/reset
  GET    /__control/websockets                    connections, messages, health
  POST   /__control/token                         {token} the accepted API token
  GET    /__control/sessions                      emulator (authentik) sessions
  POST   /__control/app_password                  {username, password} for client_credentials
  GET    /__control/oauth_calls[?reset=1]         every call to /application/o/... (path, pid)
  POST   /__control/user_attributes               {username, attributes} merged into the user's
  (scope_claims values may be {"by_user": {username: claims}}: per-user mapping results)
  POST   /__control/faults                        {api_status?, api_count?, api_stall_ms?}
  GET    /__control/events                        events POSTed to /api/v3/events/events/
  GET    /__control/users                         users (sub, password, claims)
  GET    /__control/tokens                        issued tokens (for tests)
  GET    /__control/token_failures                why token requests were refused
  POST   /__control/reset                         forget providers, sessions, tokens, logs,
         faults, app passwords; the outpost pk and name stay; the token goes back to --token
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import hmac
import json
import math
import os
import secrets
import signal
import socket
import string
import sys
import time
import urllib.parse
import uuid
from datetime import datetime, timezone

from aiohttp import WSMsgType, web

VERSION = "2026.8.5"  # the authentik version the emulator claims to be
BUILD_HASH = ""

ACK, HELLO, TRIGGER_UPDATE, PROVIDER_SPECIFIC, SESSION_END = 0, 1, 2, 3, 4
HEALTH_TIMEOUT = 15.0  # 1.5 x the outpost's 10 s HELLO interval
ACR_DEFAULT = "goauthentik.io/providers/oauth2/default"
DEFAULT_SCOPES = ["openid", "profile", "email", "entitlements", "ak_proxy"]
CALLBACK_QUERY = "X-authentik-auth-callback=true"
SESSION_COOKIE = "authentik_session"
CODE_TTL = 60.0

# --- users (mirrors t/provider/server.mjs) -----------------------------------------------
USERS = {
    "alice": {
        "password": "alice-password",
        "name": "Alice Liddell",
        "email": "alice@example.test",
        "email_verified": True,
        "groups": ["admins", "users"],
        "entitlements": ["app-read", "app-write"],
        "attributes": {"additionalHeaders": {"X-Custom-Team": "blue"}},
        "is_superuser": True,
    },
    "bob": {
        "password": "bob-password",
        "name": "Bob Builder",
        "email": "bob@example.test",
        "email_verified": False,
        "groups": ["users"],
        "entitlements": ["app-read"],
        "attributes": {"additionalHeaders": {"X-Custom-Team": "red"}},
        "is_superuser": False,
    },
    # authentik always emits the scope claims; carol has nothing in them
    "carol": {
        "password": "carol-password",
        "name": "",
        "email": "",
        "email_verified": False,
        "groups": [],
        "entitlements": [],
        "attributes": {},
        "is_superuser": False,
    },
    # thousands of groups: a session record over the module's max_record
    "dave": {
        "password": "dave-password",
        "name": "",
        "email": "",
        "email_verified": False,
        "groups": [f"very-long-group-name-number-{i}" for i in range(3000)],
        "entitlements": [],
        "attributes": {},
        "is_superuser": False,
    },
}


def sub_for(username: str) -> str:
    return hashlib.sha256(f"nginx-authentik-test:{username}".encode()).hexdigest()


def sid_for(session_key: str) -> str:
    return hashlib.sha256(session_key.encode()).hexdigest()


def deep_merge(into: dict, other: dict) -> dict:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


def user_claims(username: str, scopes: list[str], provider: dict) -> dict:
    """The scope-mapping claims authentik's managed mappings (plus a provider's custom
    mappings) give for a user."""
    u = USERS[username]
    claims: dict = {}
    if "profile" in scopes:
        claims.update({
            "name": u["name"],
            "given_name": u["name"],
            "preferred_username": username,
            "nickname": username,
            "groups": list(u["groups"]),
        })
    if "email" in scopes:
        claims.update({"email": u["email"], "email_verified": u["email_verified"]})
    if "entitlements" in scopes:
        claims.update({"entitlements": list(u["entitlements"]), "roles": list(u["entitlements"])})
    if "ak_proxy" in scopes:
        claims["ak_proxy"] = {"user_attributes": copy.deepcopy(u["attributes"]), "is_superuser": u["is_superuser"]}
    for scope, extra in (provider.get("scope_claims") or {}).items():
        if scope in scopes and isinstance(extra, dict):
            # {"by_user": {username: claims}}: a mapping whose expression depends on the user
            by_user = extra.get("by_user")
            if isinstance(by_user, dict):
                extra = by_user.get(username) or {}
            deep_merge(claims, extra)
    return claims


# --- small helpers ---------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def jwt_hs256(claims: dict, key: str) -> str:
    header = {"alg": "HS256", "typ": "JWT"}
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(sig)}"


def timedelta_seconds(value) -> float:
    """authentik's timedelta_from_string ("hours=1;minutes=30") in seconds; numbers pass."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    units = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1,
             "milliseconds": 0.001, "microseconds": 0.000001}
    total = 0.0
    for part in str(value).split(";"):
        part = part.strip()
        if not part:
            continue
        k, _, v = part.partition("=")
        k = k.strip().lower()
        if k not in units:
            raise ValueError(f"invalid timedelta unit {k!r} in {value!r}")
        total += float(v) * units[k]
    return total


def random_alnum(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).isoformat()


def html_escape(s) -> str:
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def page(title: str, inner: str, status: int = 200, headers: dict | None = None) -> web.Response:
    body = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html_escape(title)}</title></head>"
            f"<body><h1>{html_escape(title)}</h1>{inner}</body></html>")
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


def origin_of(request: web.Request) -> str:
    """scheme://host as Django's build_absolute_uri sees it (Host header, X-Forwarded-Proto)."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else ("https" if request.secure else "http")
    host = request.headers.get("Host") or f"{request.url.host}:{request.url.port}"
    return f"{scheme}://{host}"


def callback_uris(external_host: str) -> list[str]:
    """The provider's registered (strict) redirect URIs, as set_oauth_defaults makes them."""
    return [urllib.parse.urljoin(external_host, "outpost.goauthentik.io/callback") + "?" + CALLBACK_QUERY,
            external_host + "?" + CALLBACK_QUERY]


# --- which process is on the other end of a loopback connection ---------------------------------
def _hex_addr(ip: str, port: int) -> str:
    packed = socket.inet_aton(ip)
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def peer_pid(peer: tuple, local: tuple) -> int | None:
    """The pid owning the client end of a loopback TCP connection (via /proc), or None."""
    try:
        want_local, want_rem = _hex_addr(peer[0], peer[1]), _hex_addr(local[0], local[1])
    except (OSError, ValueError, IndexError):
        return None
    inode = None
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[1] == want_local and cols[2] == want_rem:
                    inode = cols[9]
                    break
    except OSError:
        return None
    if not inode or inode == "0":
        return None
    target = f"socket:[{inode}]"
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        return int(entry)
                except OSError:
                    continue
        except OSError:
            continue
    return None


# --- the emulator ------------------------------------------------------------------------------
PROVIDER_FIELDS = {
    "name", "slug", "app_name", "external_host", "internal_host", "internal_host_ssl_validation", "mode",
    "cookie_domain", "skip_path_regex", "client_id", "client_secret", "cookie_secret", "certificate",
    "basic_auth_enabled", "basic_auth_user_attribute", "basic_auth_password_attribute", "intercept_header_auth",
    "access_token_validity", "scopes", "scope_claims", "global_issuer",
}
MODES = ("proxy", "forward_single", "forward_domain")


class Emulator:
    def __init__(self, token: str, outpost_name: str, state_file: str | None):
        self.initial_token = token
        self.state_file = state_file
        self.token = token
        self.outpost = {"pk": str(uuid.uuid4()), "name": outpost_name, "config": {}}
        self.providers: dict[str, dict] = {}  # name -> record
        self.next_pk = 1
        self.sessions: dict[str, dict] = {}  # session key -> {username, created, auth_time}
        self.app_passwords: dict[str, list[str]] = {}
        self.flow_uuids = {k: str(uuid.uuid4()) for k in ("authentication", "authorization", "invalidation")}
        self.load()
        # volatile
        self.codes: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.interactions: dict[str, dict] = {}
        self.api_calls: list[dict] = []
        # every call to the OAuth2 endpoints (/application/o/...): header authentication and
        # logins are counted by the tests
        self.oauth_calls: list[dict] = []
        self.events: list[dict] = []
        self.ws_conns: list[dict] = []
        self.ws_messages: list[dict] = []
        self.outpost_states: dict[str, dict] = {}  # instance uuid -> state
        self.sent: list[dict] = []  # messages pushed to websockets
        self.faults: dict = {}
        self.token_failures: list[dict] = []  # why token requests failed (for test diagnostics)
        self.pid_cache: dict[tuple, int | None] = {}
        self.conn_seq = 0

    # -- persistence --
    def load(self):
        if not self.state_file or not os.path.exists(self.state_file):
            return
        with open(self.state_file) as f:
            data = json.load(f)
        self.token = data.get("token", self.token)
        self.initial_token = data.get("initial_token", self.initial_token)
        self.outpost = data.get("outpost", self.outpost)
        self.providers = data.get("providers", {})
        self.next_pk = data.get("next_pk", 1)
        self.sessions = data.get("sessions", {})
        self.app_passwords = data.get("app_passwords", {})
        self.flow_uuids = data.get("flow_uuids", self.flow_uuids)

    def save(self):
        if not self.state_file:
            return
        data = {"token": self.token, "initial_token": self.initial_token, "outpost": self.outpost,
                "providers": self.providers, "next_pk": self.next_pk, "sessions": self.sessions,
                "app_passwords": self.app_passwords, "flow_uuids": self.flow_uuids}
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.state_file)

    # -- outpost --
    def outpost_config(self, request: web.Request) -> dict:
        cfg = {
            "authentik_host": origin_of(request) + "/",
            "authentik_host_insecure": False,
            "authentik_host_browser": "",
            "log_level": "info",
            "object_naming_template": "ak-outpost-%(name)s",
            "refresh_interval": "minutes=5",
            "docker_network": None,
            "docker_map_ports": True,
            "docker_labels": None,
            "container_image": None,
            "kubernetes_replicas": 1,
            "kubernetes_namespace": "authentik",
            "kubernetes_ingress_annotations": {},
            "kubernetes_ingress_secret_name": "authentik-outpost-tls",
            "kubernetes_ingress_class_name": None,
            "kubernetes_ingress_path_type": None,
            "kubernetes_service_type": "ClusterIP",
            "kubernetes_disabled_components": [],
            "kubernetes_image_pull_secrets": [],
            "kubernetes_json_patches": None,
        }
        cfg.update(self.outpost.get("config") or {})
        return cfg

    def refresh_interval_s(self, cfg: dict) -> int:
        try:
            return int(timedelta_seconds(cfg.get("refresh_interval", "minutes=5")))
        except ValueError:
            return 300

    def mapping_uuid(self, scope: str) -> str:
        return str(uuid.uuid5(uuid.UUID(self.outpost["pk"]), "scope-mapping:" + scope))

    def provider_obj(self, p: dict) -> dict:
        """ProviderSerializer, as in the outpost's providers_obj."""
        return {
            "pk": p["pk"],
            "name": p["name"],
            "authentication_flow": None,
            "authorization_flow": self.flow_uuids["authorization"],
            "invalidation_flow": self.flow_uuids["invalidation"],
            "property_mappings": [self.mapping_uuid(s) for s in p["scopes"]],
            "component": "ak-provider-proxy-form",
            "assigned_application_slug": p["slug"],
            "assigned_application_name": p["app_name"],
            "assigned_backchannel_application_slug": None,
            "assigned_backchannel_application_name": None,
            "verbose_name": "Proxy Provider",
            "verbose_name_plural": "Proxy Providers",
            "meta_model_name": "authentik_providers_proxy.proxyprovider",
        }

    def outpost_json(self, request: web.Request) -> dict:
        cfg = self.outpost_config(request)
        provs = sorted(self.providers.values(), key=lambda p: p["pk"])
        return {
            "pk": self.outpost["pk"],
            "name": self.outpost["name"],
            "type": "proxy",
            "providers": [p["pk"] for p in provs],
            "providers_obj": [self.provider_obj(p) for p in provs],
            "service_connection": None,
            "service_connection_obj": None,
            "refresh_interval_s": self.refresh_interval_s(cfg),
            "token_identifier": f"ak-outpost-{self.outpost['pk']}-api",
            "config": cfg,
            "managed": None,
        }

    # -- providers --
    def provider_by_slug(self, slug: str) -> dict | None:
        for p in self.providers.values():
            if p["slug"] == slug:
                return p
        return None

    def provider_by_client(self, client_id: str) -> dict | None:
        for p in self.providers.values():
            if p["client_id"] == client_id:
                return p
        return None

    def issuer(self, p: dict, request: web.Request) -> str:
        o = origin_of(request)
        return o + "/" if p.get("global_issuer") else f"{o}/application/o/{p['slug']}/"

    def oidc_info(self, p: dict, request: web.Request) -> dict:
        """ProviderInfoView.get_info: discovery, also embedded as oidc_configuration."""
        o = origin_of(request)
        scopes = list(p["scopes"])
        if "openid" not in scopes:
            scopes.append("openid")
        return {
            "issuer": self.issuer(p, request),
            "authorization_endpoint": f"{o}/application/o/authorize/",
            "token_endpoint": f"{o}/application/o/token/",
            "userinfo_endpoint": f"{o}/application/o/userinfo/",
            "end_session_endpoint": f"{o}/application/o/{p['slug']}/end-session/",
            "introspection_endpoint": f"{o}/application/o/introspect/",
            "revocation_endpoint": f"{o}/application/o/revoke/",
            "device_authorization_endpoint": f"{o}/application/o/device/",
            "response_types_supported": ["code", "id_token", "id_token token", "code token", "code id_token",
                                         "code id_token token"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "jwks_uri": f"{o}/application/o/{p['slug']}/jwks/",
            "grant_types_supported": ["authorization_code", "refresh_token", "implicit", "client_credentials",
                                      "password", "urn:ietf:params:oauth:grant-type:device_code"],
            "id_token_signing_alg_values_supported": ["HS256"],
            "subject_types_supported": ["public"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "acr_values_supported": [ACR_DEFAULT],
            "scopes_supported": scopes,
            "request_parameter_supported": False,
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr"],
            "claims_parameter_supported": False,
            "code_challenge_methods_supported": ["plain", "S256"],
        }

    def proxy_config(self, p: dict, request: web.Request) -> dict:
        """ProxyOutpostConfigSerializer."""
        return {
            "pk": p["pk"],
            "name": p["name"],
            "internal_host": p["internal_host"],
            "external_host": p["external_host"],
            "internal_host_ssl_validation": p["internal_host_ssl_validation"],
            "client_id": p["client_id"],
            "client_secret": p["client_secret"],
            "oidc_configuration": self.oidc_info(p, request),
            "cookie_secret": p["cookie_secret"],
            "certificate": p["certificate"],
            "skip_path_regex": p["skip_path_regex"],
            "basic_auth_enabled": p["basic_auth_enabled"],
            "basic_auth_password_attribute": p["basic_auth_password_attribute"],
            "basic_auth_user_attribute": p["basic_auth_user_attribute"],
            "mode": p["mode"],
            "cookie_domain": p["cookie_domain"],
            "access_token_validity": float(p["access_token_validity"]),
            "intercept_header_auth": p["intercept_header_auth"],
            "scopes_to_request": list(p["scopes"]),
            "assigned_application_slug": p["slug"],
            "assigned_application_name": p["app_name"],
        }

    def validate_provider(self, rec: dict):
        for k in ("name", "slug", "external_host"):
            if not isinstance(rec.get(k), str) or not rec[k]:
                raise ValueError(f"{k} is required (a non-empty string)")
        if rec["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if not isinstance(rec["scopes"], list) or not all(isinstance(s, str) for s in rec["scopes"]):
            raise ValueError("scopes must be a list of strings")
        if rec["access_token_validity"] <= 0:
            raise ValueError("access_token_validity must be positive")

    def create_provider(self, fields: dict) -> dict:
        unknown = set(fields) - PROVIDER_FIELDS
        if unknown:
            raise ValueError(f"unknown provider fields {sorted(unknown)}")
        if fields.get("name") in self.providers:
            raise ValueError(f"provider {fields['name']!r} exists")
        if fields.get("slug") and self.provider_by_slug(fields["slug"]):
            raise ValueError(f"slug {fields['slug']!r} is taken")
        rec = {
            "pk": self.next_pk,
            "name": fields.get("name"),
            "slug": fields.get("slug"),
            "app_name": fields.get("app_name") or fields.get("slug") or "",
            "external_host": fields.get("external_host"),
            "internal_host": fields.get("internal_host", "http://127.0.0.1:1"),
            "internal_host_ssl_validation": fields.get("internal_host_ssl_validation", True),
            "mode": fields.get("mode", "proxy"),
            "cookie_domain": fields.get("cookie_domain", ""),
            "skip_path_regex": fields.get("skip_path_regex", ""),
            "client_id": fields.get("client_id") or random_alnum(40),
            "client_secret": fields.get("client_secret") or random_alnum(128),
            "cookie_secret": fields.get("cookie_secret") or random_alnum(32, string.ascii_uppercase + string.digits),
            "certificate": fields.get("certificate"),
            "basic_auth_enabled": fields.get("basic_auth_enabled", False),
            "basic_auth_user_attribute": fields.get("basic_auth_user_attribute", ""),
            "basic_auth_password_attribute": fields.get("basic_auth_password_attribute", ""),
            "intercept_header_auth": fields.get("intercept_header_auth", True),
            "access_token_validity": timedelta_seconds(fields.get("access_token_validity", "hours=24")),
            "scopes": list(fields["scopes"]) if fields.get("scopes") is not None else list(DEFAULT_SCOPES),
            "scope_claims": fields.get("scope_claims") or {},
            "global_issuer": bool(fields.get("global_issuer", False)),
        }
        for s in rec["scope_claims"]:
            if s not in rec["scopes"]:
                rec["scopes"].append(s)
        self.validate_provider(rec)
        self.next_pk += 1
        self.providers[rec["name"]] = rec
        return rec

    def update_provider(self, name: str, fields: dict) -> dict:
        rec = copy.deepcopy(self.providers[name])
        unknown = set(fields) - PROVIDER_FIELDS
        if unknown:
            raise ValueError(f"unknown provider fields {sorted(unknown)}")
        for k, v in fields.items():
            if k == "access_token_validity":
                v = timedelta_seconds(v)
            rec[k] = v
        for s in rec.get("scope_claims") or {}:
            if s not in rec["scopes"]:
                rec["scopes"].append(s)
        if rec["name"] != name and rec["name"] in self.providers:
            raise ValueError(f"provider {rec['name']!r} exists")
        other = self.provider_by_slug(rec["slug"])
        if other is not None and other["pk"] != rec["pk"]:
            raise ValueError(f"slug {rec['slug']!r} is taken")
        self.validate_provider(rec)
        del self.providers[name]
        self.providers[rec["name"]] = rec
        return rec

    # -- websocket pushes --
    async def broadcast(self, instruction: int, args: dict) -> int:
        msg = {"instruction": instruction, "args": args}
        n = 0
        for c in self.ws_conns:
            ws = c.get("ws")
            if c["connected"] and ws is not None and not ws.closed:
                try:
                    await ws.send_json(msg)
                    n += 1
                    c["sent"].append({"at": time.time(), **msg})
                except (ConnectionError, RuntimeError):
                    pass
        self.sent.append({"at": time.time(), "instruction": instruction, "args": args, "delivered": n})
        return n

    async def end_sessions(self, keys: list[str]) -> dict:
        ended = []
        notified = 0
        for key in keys:
            if self.sessions.pop(key, None) is None:
                continue
            sid = sid_for(key)
            ended.append(sid)
            notified += await self.broadcast(SESSION_END, {"type": "event.session.end", "session_id": sid})
        if ended:
            self.save()
        return {"ended": ended, "notified": notified}

    # -- API auth & logging --
    def api_denied(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "").strip()
        if not auth or " " not in auth:
            return web.json_response({"detail": "Authentication credentials were not provided."}, status=403)
        kind, _, cred = auth.partition(" ")
        if kind.lower() != "bearer":
            return web.json_response({"detail": "Unsupported authentication type"}, status=403)
        if not cred:
            return web.json_response({"detail": "Malformed header"}, status=403)
        if not hmac.compare_digest(cred.encode(), self.token.encode()):
            return web.json_response({"detail": "Token invalid/expired"}, status=403)
        return None

    def peer_info(self, request: web.Request) -> tuple[str, int | None]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        local = request.transport.get_extra_info("sockname") if request.transport else None
        if not peer:
            return "", None
        # per connection (a port can be reused by another process later)
        key = (id(request.transport), peer[0], peer[1])
        if key not in self.pid_cache:
            self.pid_cache[key] = peer_pid(peer, local) if local else None
        return f"{peer[0]}:{peer[1]}", self.pid_cache[key]


def paginate(request: web.Request, items: list) -> dict:
    try:
        page_no = int(request.query.get("page", "1"))
        size = int(request.query.get("page_size", "100"))
    except ValueError:
        raise web.HTTPNotFound(text=json.dumps({"detail": "Invalid page."}), content_type="application/json")
    size = max(1, size)
    count = len(items)
    pages = max(1, math.ceil(count / size))
    if page_no < 1 or page_no > pages:
        raise web.HTTPNotFound(text=json.dumps({"detail": "Invalid page."}), content_type="application/json")
    chunk = items[(page_no - 1) * size: page_no * size]
    return {
        "pagination": {
            "next": page_no + 1 if page_no < pages else 0,
            "previous": page_no - 1 if page_no > 1 else 0,
            "count": count,
            "current": page_no,
            "total_pages": pages,
            "start_index": 0 if count == 0 else (page_no - 1) * size + 1,
            "end_index": count if page_no == pages else page_no * size,
        },
        "results": chunk,
        "autocomplete": {},
    }


# --- HTTP handlers ------------------------------------------------------------------------------
def build_app(em: Emulator) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def api_middleware(request: web.Request, handler):
        if request.path.startswith("/application/o/"):
            peer, pid = em.peer_info(request)
            em.oauth_calls.append({"at": time.time(), "method": request.method, "path": request.path,
                                   "pid": pid, "host": request.headers.get("Host", "")})
            return await handler(request)
        if not request.path.startswith("/api/v3/"):
            return await handler(request)
        peer, pid = em.peer_info(request)
        entry = {"at": time.time(), "method": request.method, "path": request.path,
                 "query": request.query_string, "user_agent": request.headers.get("User-Agent", ""),
                 "peer": peer, "pid": pid, "host": request.headers.get("Host", "")}
        em.api_calls.append(entry)
        f = em.faults
        if f.get("api_stall_ms"):
            await asyncio.sleep(f["api_stall_ms"] / 1000)
        if f.get("api_status") and f.get("api_count", 1) != 0:
            if f.get("api_count") is not None and f["api_count"] > 0:
                f["api_count"] -= 1
            entry["status"] = f["api_status"]
            return web.json_response({"detail": "emulated failure"}, status=f["api_status"])
        denied = em.api_denied(request)
        if denied is not None:
            entry["status"] = denied.status
            return denied
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            entry["status"] = e.status
            raise
        entry["status"] = resp.status
        return resp

    # -- REST API --
    @routes.get("/api/v3/outposts/instances/")
    async def outposts(request):
        items = [em.outpost_json(request)]
        name = request.query.get("name__iexact")
        if name is not None:
            items = [o for o in items if o["name"].lower() == name.lower()]
        return web.json_response(paginate(request, items))

    @routes.get("/api/v3/outposts/instances/{pk}/")
    async def outpost_one(request):
        if request.match_info["pk"] != em.outpost["pk"]:
            return web.json_response({"detail": "Not found."}, status=404)
        return web.json_response(em.outpost_json(request))

    @routes.get("/api/v3/outposts/instances/{pk}/health/")
    async def outpost_health(request):
        if request.match_info["pk"] != em.outpost["pk"]:
            return web.json_response({"detail": "Not found."}, status=404)
        out = []
        cutoff = time.time() - HEALTH_TIMEOUT
        for uid, st in em.outpost_states.items():
            if st["last_seen"] < cutoff:
                continue
            out.append({
                "uid": uid,
                "last_seen": now_iso(st["last_seen"]),
                "version": st["version"],
                "golang_version": st["golang_version"],
                "openssl_enabled": st["openssl_enabled"],
                "openssl_version": st["openssl_version"],
                "fips_enabled": None,  # authentik shows it only with a valid enterprise license
                "version_should": VERSION,
                "version_outdated": st["version"] != VERSION,
                "build_hash": st["build_hash"],
                "build_hash_should": BUILD_HASH,
                "hostname": st["hostname"],
            })
        return web.json_response(out)

    @routes.get("/api/v3/outposts/proxy/")
    async def proxy_list(request):
        provs = sorted(em.providers.values(), key=lambda p: p["name"])
        name = request.query.get("name")
        if name is not None:
            provs = [p for p in provs if p["name"] == name]
        search = request.query.get("search")
        if search:
            provs = [p for p in provs if search.lower() in p["name"].lower()]
        return web.json_response(paginate(request, [em.proxy_config(p, request) for p in provs]))

    @routes.get("/api/v3/root/config/")
    async def root_config(request):
        return web.json_response({
            "error_reporting": {"enabled": False, "sentry_dsn": "", "environment": "", "send_pii": False,
                                "traces_sample_rate": 0.0},
            "capabilities": ["can_save_media", "can_impersonate"],
            "cache_timeout": 300,
            "cache_timeout_flows": 300,
            "cache_timeout_policies": 300,
        })

    @routes.post("/api/v3/events/events/")
    async def events_post(request):
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"non_field_errors": ["Invalid data."]}, status=400)
        if not isinstance(body, dict) or not body.get("action") or not body.get("app"):
            return web.json_response({"action": ["This field is required."]}, status=400)
        ev = {"pk": str(uuid.uuid4()), "user": body.get("user") or {}, "action": body["action"], "app": body["app"],
              "context": body.get("context") or {}, "client_ip": body.get("client_ip"), "created": now_iso(),
              "expires": now_iso(time.time() + 365 * 86400), "brand": body.get("brand") or {}}
        em.events.append(ev)
        return web.json_response(ev, status=201)

    @routes.route("*", "/api/v3/{tail:.*}")
    async def api_unknown(request):
        return web.json_response({"detail": "Not found."}, status=404)

    # -- websocket --
    @routes.get("/ws/outpost/{pk}/")
    async def ws_outpost(request):
        peer, pid = em.peer_info(request)
        em.conn_seq += 1
        rec = {"id": em.conn_seq, "instance_uuid": request.query.get("instance_uuid", ""),
               "attempt": request.query.get("attempt"), "query": request.query_string, "peer": peer, "pid": pid,
               "user_agent": request.headers.get("User-Agent", ""), "connected_at": time.time(),
               "disconnected_at": None, "connected": False, "hello_count": 0, "last_hello": None,
               "last_hello_at": None, "messages": 0, "rejected": None, "close_code": None, "sent": []}
        em.ws_conns.append(rec)
        denied = em.api_denied(request)
        if denied is not None:
            rec["rejected"] = "token"
            return web.Response(status=403, text="Access denied")
        if request.match_info["pk"] != em.outpost["pk"]:
            rec["rejected"] = "pk"
            return web.Response(status=403, text="Access denied")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        rec["ws"] = ws
        rec["transport"] = request.transport
        rec["connected"] = True
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                    instruction = int(data["instruction"])
                    args = data.get("args") or {}
                    if not isinstance(args, dict):
                        raise ValueError("args")
                except (ValueError, KeyError, TypeError):
                    em.ws_messages.append({"at": time.time(), "conn": rec["id"], "invalid": msg.data[:500]})
                    continue
                em.ws_messages.append({"at": time.time(), "conn": rec["id"], "instruction": instruction,
                                       "args": args})
                if instruction == ACK:
                    continue
                rec["messages"] += 1
                if instruction == HELLO:
                    rec["hello_count"] += 1
                    rec["last_hello"] = args
                    rec["last_hello_at"] = time.time()
                # authentik's OutpostConsumer: every non-ACK message refreshes last_seen and
                # hostname (missing -> ""); the versions only come with a HELLO
                inst = rec["instance_uuid"] or str(args.get("uuid", ""))
                st = em.outpost_states.setdefault(inst, {
                    "count": 0, "version": "", "build_hash": "", "golang_version": "", "openssl_enabled": False,
                    "openssl_version": "", "fips_enabled": False, "args": {}})
                rest = dict(args)
                st["last_seen"] = time.time()
                st["hostname"] = str(rest.pop("hostname", ""))
                if instruction == HELLO:
                    st["version"] = str(rest.pop("version", ""))
                    st["build_hash"] = str(rest.pop("buildHash", ""))
                    st["golang_version"] = str(rest.pop("golangVersion", ""))
                    st["openssl_enabled"] = bool(rest.pop("opensslEnabled", False))
                    st["openssl_version"] = str(rest.pop("opensslVersion", ""))
                    st["fips_enabled"] = bool(rest.pop("fipsEnabled", False))
                    st["args"].update(rest)
                st["count"] += 1
                await ws.send_json({"instruction": ACK, "args": {}})
        finally:
            rec["connected"] = False
            rec["disconnected_at"] = time.time()
            rec["close_code"] = ws.close_code
        return ws

    # -- OAuth2 / OIDC --
    @routes.get("/application/o/{slug}/.well-known/openid-configuration")
    async def discovery(request):
        p = em.provider_by_slug(request.match_info["slug"])
        if p is None:
            return web.json_response({"detail": "Not found."}, status=404)
        return web.json_response(em.oidc_info(p, request))

    @routes.get("/application/o/{slug}/jwks/")
    async def jwks(request):
        if em.provider_by_slug(request.match_info["slug"]) is None:
            return web.json_response({"detail": "Not found."}, status=404)
        return web.json_response({"keys": []})

    def oauth_error_page(msg: str, status: int = 400) -> web.Response:
        return page("Error", f'<p id="error">{html_escape(msg)}</p>', status=status)

    def redirect_with(uri: str, params: dict) -> web.Response:
        sep = "&" if "?" in uri else "?"
        return web.Response(status=302, headers={"Location": uri + sep + urllib.parse.urlencode(params)})

    def current_session(request) -> tuple[str, dict] | tuple[None, None]:
        key = request.cookies.get(SESSION_COOKIE)
        if key and key in em.sessions:
            return key, em.sessions[key]
        return None, None

    def issue_code(params: dict, p: dict, key: str, sess: dict) -> web.Response:
        code = secrets.token_hex(32)
        # the requested scopes that the provider has mappings for
        scopes = [s for s in dict.fromkeys(params.get("scope", "").split()) if s in p["scopes"]]
        em.codes[code] = {"provider": p["name"], "client_id": p["client_id"], "redirect_uri": params["redirect_uri"],
                          "username": sess["username"], "session_key": key, "scopes": scopes,
                          "nonce": params.get("nonce"), "code_challenge": params.get("code_challenge"),
                          "code_challenge_method": params.get("code_challenge_method") or "plain",
                          "auth_time": sess["auth_time"], "expires": time.time() + CODE_TTL, "used": False}
        out = {"code": code}
        if "state" in params:
            out["state"] = params["state"]
        return redirect_with(params["redirect_uri"], out)

    @routes.route("*", "/application/o/authorize/")
    async def authorize(request):
        if request.method not in ("GET", "POST"):
            return web.Response(status=405)
        params = dict(request.query)
        if request.method == "POST":
            params.update(dict(await request.post()))
        p = em.provider_by_client(params.get("client_id", ""))
        if p is None:
            return oauth_error_page("Invalid client identifier (client_id).")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in callback_uris(p["external_host"]):
            return oauth_error_page("Redirect URI Error: the request fails due to a missing, invalid, or "
                                    "mismatching redirection URI (redirect_uri).")
        err = {"state": params["state"]} if "state" in params else {}
        if params.get("response_type") != "code":
            return redirect_with(redirect_uri, {"error": "unsupported_response_type", **err})
        if params.get("code_challenge"):
            method = params.get("code_challenge_method") or "plain"
            if method not in ("S256", "plain"):
                return redirect_with(redirect_uri, {"error": "invalid_request",
                                                    "error_description": "Unsupported challenge method", **err})
        key, sess = current_session(request)
        if key is not None:
            return issue_code(params, p, key, sess)
        uid = secrets.token_urlsafe(16)
        em.interactions[uid] = {"params": params, "created": time.time()}
        return web.Response(status=302, headers={"Location": f"/interaction/{uid}"})

    def login_form(uid: str, p: dict, error: str = "", username: str = "", status: int = 200) -> web.Response:
        err = f'<p id="error">{html_escape(error)}</p>' if error else ""
        return page("Sign in", f"""{err}
<p>Sign in to continue to <b>{html_escape(p['app_name'])}</b>.</p>
<form id="login" method="post" action="/interaction/{html_escape(uid)}/login" autocomplete="off">
  <label>Username <input name="username" value="{html_escape(username)}"></label>
  <label>Password <input name="password" type="password"></label>
  <button type="submit">Sign in</button>
</form>""", status=status)

    @routes.get("/interaction/{uid}")
    async def interaction(request):
        it = em.interactions.get(request.match_info["uid"])
        if it is None:
            return oauth_error_page("Login expired.")
        p = em.provider_by_client(it["params"].get("client_id", ""))
        if p is None:
            return oauth_error_page("Invalid client identifier (client_id).")
        return login_form(request.match_info["uid"], p)

    @routes.post("/interaction/{uid}/login")
    async def interaction_login(request):
        uid = request.match_info["uid"]
        it = em.interactions.get(uid)
        if it is None:
            return oauth_error_page("Login expired.")
        p = em.provider_by_client(it["params"].get("client_id", ""))
        if p is None:
            return oauth_error_page("Invalid client identifier (client_id).")
        form = await request.post()
        username = form.get("username", "")
        if username not in USERS or form.get("password") != USERS[username]["password"]:
            return login_form(uid, p, "Invalid username or password.", username, status=401)
        del em.interactions[uid]
        key = secrets.token_hex(16)
        em.sessions[key] = {"username": username, "created": time.time(), "auth_time": int(time.time())}
        em.save()
        resp = issue_code(it["params"], p, key, em.sessions[key])
        resp.set_cookie(SESSION_COOKIE, key, path="/", httponly=True, samesite="Lax")
        return resp

    def client_auth(request, form) -> tuple[str, str | None]:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                raw = base64.b64decode(auth[6:].strip()).decode()
                # like authentik's extract_client_auth: no form-decoding of the two parts
                cid, _, secret = raw.partition(":")
                return cid, secret
            except (ValueError, UnicodeDecodeError):
                return "", None
        return form.get("client_id", ""), form.get("client_secret")

    token_errors = {
        "invalid_request": "The request is otherwise malformed",
        "invalid_client": "Client authentication failed (e.g., unknown client, no client authentication "
                          "included, or unsupported authentication method)",
        "invalid_grant": "The provided authorization grant or refresh token is invalid, expired, revoked, does "
                         "not match the redirection URI used in the authorization request, or was issued to "
                         "another client",
        "unsupported_grant_type": "The authorization grant type is not supported by the authorization server.",
    }

    def token_error(error: str, why: str = "") -> web.Response:
        """authentik's TokenError: always 400, {error, error_description}."""
        body = {"error": error, "error_description": token_errors.get(error, error)}
        if why:
            em.token_failures.append({"at": time.time(), "error": error, "why": why})
        return web.json_response(body, status=400, headers={"Cache-Control": "no-store"})

    def mint(p: dict, request, username: str, scopes: list[str], session_key: str | None, nonce: str | None,
             auth_time: int) -> dict:
        now = int(time.time())
        validity = int(p["access_token_validity"])
        claims = {
            "iss": em.issuer(p, request),
            "sub": sub_for(username),
            "aud": p["client_id"],
            "exp": now + validity,
            "iat": now,
            "auth_time": auth_time,
            "acr": ACR_DEFAULT,
            "amr": ["pwd"],
        }
        if nonce:
            claims["nonce"] = nonce
        if session_key:
            claims["sid"] = sid_for(session_key)
        claims.update(user_claims(username, scopes, p))
        id_claims = {**claims, "jti": secrets.token_hex(16)}
        at_claims = {**claims, "jti": secrets.token_hex(16), "azp": p["client_id"],
                     "uid": secrets.token_hex(24), "scope": " ".join(scopes)}
        id_token = jwt_hs256(id_claims, p["client_secret"])
        access_token = jwt_hs256(at_claims, p["client_secret"])
        em.tokens[access_token] = {"provider": p["name"], "client_id": p["client_id"], "claims": id_claims,
                                   "scopes": scopes, "exp": claims["exp"], "revoked": False, "username": username,
                                   "session_key": session_key}
        return {"access_token": access_token, "token_type": "Bearer", "scope": " ".join(scopes),
                "expires_in": validity, "id_token": id_token}

    @routes.post("/application/o/token/")
    async def token(request):
        form = await request.post()
        grant = form.get("grant_type", "")
        cid, secret = client_auth(request, form)
        p = em.provider_by_client(cid)
        if p is None:
            return token_error("invalid_client", "unknown client_id")
        # the order of authentik's TokenParams checks
        if grant == "authorization_code":
            if secret is None or not hmac.compare_digest(secret.encode(), p["client_secret"].encode()):
                return token_error("invalid_client", "wrong or missing client_secret")
            raw_code = form.get("code", "")
            if not raw_code:
                return token_error("invalid_grant", "no code")
            # redirect_uri: one of the provider's registered URIs (not compared with the authorize's)
            if form.get("redirect_uri", "") not in callback_uris(p["external_host"]):
                return token_error("invalid_client", "redirect_uri is not registered")
            code = em.codes.get(raw_code)
            if code is None or code["used"]:
                return token_error("invalid_grant", "unknown or used code")
            if code["expires"] < time.time() or code["client_id"] != cid:
                return token_error("invalid_grant", "expired code, or another client's")
            verifier = form.get("code_verifier") or ""
            if code["code_challenge"]:
                if not verifier:
                    return token_error("invalid_grant", "PKCE code_verifier missing")
                if code["code_challenge_method"] == "S256":
                    computed = b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
                else:
                    computed = verifier
                if not hmac.compare_digest(computed.encode(), code["code_challenge"].encode()):
                    return token_error("invalid_grant", "PKCE code_verifier does not match")
            elif verifier:
                return token_error("invalid_grant", "code_verifier for a code without PKCE (downgrade)")
            if code["session_key"] not in em.sessions:
                # the code went with its authentik session
                return token_error("invalid_grant", "the authentik session of this code has ended")
            code["used"] = True  # authentik deletes the code
            body = mint(p, request, code["username"], code["scopes"], code["session_key"], code["nonce"],
                        code["auth_time"])
            return web.json_response(body, headers={"Cache-Control": "no-store"})
        if grant == "refresh_token":
            return token_error("invalid_grant", "the emulator issues no refresh tokens")
        if grant in ("client_credentials", "password"):
            username = form.get("username", "")
            password = form.get("password", "")
            if not username:
                return token_error("invalid_grant", "only the username/app-password variant is emulated")
            if username not in USERS or password not in em.app_passwords.get(username, []):
                return token_error("invalid_grant", "unknown user or not an app password")
            scopes = [s for s in dict.fromkeys(form.get("scope", "").split()) if s in p["scopes"]]
            body = mint(p, request, username, scopes, None, None, int(time.time()))
            return web.json_response(body, headers={"Cache-Control": "no-store"})
        return token_error("unsupported_grant_type", f"grant_type {grant!r} is not supported")

    def live_token(raw: str) -> dict | None:
        t = em.tokens.get(raw)
        if t is None or t["revoked"] or t["exp"] < time.time():
            return None
        if t["session_key"] and t["session_key"] not in em.sessions:
            # authentik revokes the tokens of an ended session
            return None
        return t

    @routes.route("*", "/application/o/userinfo/")
    async def userinfo(request):
        auth = request.headers.get("Authorization", "")
        raw = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not raw and request.method == "POST":
            raw = (await request.post()).get("access_token", "")
        t = live_token(raw)
        if t is None:
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": 'error="invalid_token"'})
        p = em.providers.get(t["provider"])
        out = {"sub": t["claims"]["sub"]}
        out.update(user_claims(t["username"], t["scopes"], p or {}))
        return web.json_response(out)

    @routes.post("/application/o/introspect/")
    async def introspect(request):
        form = await request.post()
        cid, secret = client_auth(request, form)
        p = em.provider_by_client(cid)
        if p is None or secret is None or not hmac.compare_digest(secret.encode(), p["client_secret"].encode()):
            return web.json_response({"active": False})
        t = live_token(form.get("token", ""))
        if t is None or t["client_id"] != cid:
            return web.json_response({"active": False})
        return web.json_response({**t["claims"], "active": True, "scope": " ".join(t["scopes"]), "client_id": cid})

    @routes.post("/application/o/revoke/")
    async def revoke(request):
        form = await request.post()
        t = em.tokens.get(form.get("token", ""))
        if t is not None:
            t["revoked"] = True
        return web.json_response({})

    @routes.get("/application/o/{slug}/end-session/")
    async def end_session(request):
        p = em.provider_by_slug(request.match_info["slug"])
        if p is None:
            return web.json_response({"detail": "Not found."}, status=404)
        key, _ = current_session(request)
        if key is not None:
            await em.end_sessions([key])
        target = request.query.get("post_logout_redirect_uri")
        if target:
            resp = web.Response(status=302, headers={"Location": target})
        else:
            resp = page("Signed out", f"<p>You've logged out of {html_escape(p['app_name'])}.</p>")
        resp.del_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- control --
    def bad(msg: str, status: int = 400) -> web.Response:
        return web.json_response({"error": msg}, status=status)

    async def body_json(request):
        if not request.can_read_body:
            return {}
        try:
            return await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text=json.dumps({"error": "invalid JSON"}), content_type="application/json")

    def notify_wanted(request) -> bool:
        return request.query.get("notify", "0") not in ("0", "", "false", "no")

    @routes.get("/__control/providers")
    async def c_providers(request):
        return web.json_response(sorted(em.providers.values(), key=lambda p: p["pk"]))

    @routes.post("/__control/providers")
    async def c_providers_add(request):
        body = await body_json(request)
        many = isinstance(body, list)
        made = []
        try:
            for f in (body if many else [body]):
                made.append(em.create_provider(f))
        except (ValueError, TypeError) as e:
            for rec in made:
                em.providers.pop(rec["name"], None)
            return bad(str(e))
        em.save()
        if notify_wanted(request):
            await em.broadcast(TRIGGER_UPDATE, {})
        out = [em.proxy_config(p, request) for p in made]
        return web.json_response(out if many else out[0], status=201)

    @routes.patch("/__control/providers/{name}")
    async def c_providers_patch(request):
        name = request.match_info["name"]
        if name not in em.providers:
            return bad(f"no provider {name!r}", 404)
        try:
            rec = em.update_provider(name, await body_json(request))
        except (ValueError, TypeError) as e:
            return bad(str(e))
        em.save()
        if notify_wanted(request):
            await em.broadcast(TRIGGER_UPDATE, {})
        return web.json_response(em.proxy_config(rec, request))

    @routes.delete("/__control/providers/{name}")
    async def c_providers_delete(request):
        name = request.match_info["name"]
        if em.providers.pop(name, None) is None:
            return bad(f"no provider {name!r}", 404)
        em.save()
        if notify_wanted(request):
            await em.broadcast(TRIGGER_UPDATE, {})
        return web.json_response({"deleted": name})

    @routes.post("/__control/outpost")
    async def c_outpost(request):
        body = await body_json(request)
        if "name" in body:
            em.outpost["name"] = str(body["name"])
        if "config" in body:
            em.outpost["config"] = {**(em.outpost.get("config") or {}), **body["config"]}
        em.save()
        if notify_wanted(request):
            await em.broadcast(TRIGGER_UPDATE, {})
        return web.json_response(em.outpost_json(request))

    @routes.post("/__control/trigger_update")
    async def c_trigger(request):
        return web.json_response({"notified": await em.broadcast(TRIGGER_UPDATE, {})})

    @routes.post("/__control/session_end")
    async def c_session_end(request):
        body = await body_json(request)
        keys = []
        if "username" in body:
            keys = [k for k, s in em.sessions.items() if s["username"] == body["username"]]
        elif "session_id" in body:
            want = body["session_id"]
            keys = [k for k in em.sessions if k == want or sid_for(k) == want]
            if not keys and isinstance(want, str) and want:
                # not (or no longer) ours: authentik still tells the outposts about a deleted session
                n = await em.broadcast(SESSION_END, {"type": "event.session.end", "session_id": want})
                return web.json_response({"ended": [], "notified": n})
        else:
            return bad("username or session_id required")
        return web.json_response(await em.end_sessions(keys))

    @routes.post("/__control/drop_websockets")
    async def c_drop(request):
        body = await body_json(request)
        abort = bool(body.get("abort")) if isinstance(body, dict) else False
        n = 0
        for c in em.ws_conns:
            if c["connected"] and c.get("ws") is not None and not c["ws"].closed:
                n += 1
                tr = c.get("transport")
                if abort and tr is not None:
                    tr.abort()
                else:
                    async def close(c=c, tr=tr):
                        try:
                            await asyncio.wait_for(c["ws"].close(code=1001, message=b"going away"), 2)
                        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                            pass
                        if tr is not None and not tr.is_closing():
                            tr.abort()
                    asyncio.ensure_future(close())
        return web.json_response({"dropped": n})

    def api_calls_view():
        by_path, by_ua, by_pid, by_peer = {}, {}, {}, {}
        for c in em.api_calls:
            by_path[c["path"]] = by_path.get(c["path"], 0) + 1
            by_ua[c["user_agent"]] = by_ua.get(c["user_agent"], 0) + 1
            by_pid[str(c["pid"])] = by_pid.get(str(c["pid"]), 0) + 1
            by_peer[c["peer"]] = by_peer.get(c["peer"], 0) + 1
        return {"calls": em.api_calls, "by_path": by_path, "by_user_agent": by_ua, "by_pid": by_pid,
                "by_peer": by_peer, "total": len(em.api_calls)}

    @routes.get("/__control/api_calls")
    async def c_api_calls(request):
        out = api_calls_view()
        if request.query.get("reset"):
            em.api_calls = []
        return web.json_response(out)

    @routes.post("/__control/api_calls/reset")
    async def c_api_calls_reset(request):
        em.api_calls = []
        return web.json_response({"ok": True})

    def ws_view(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in ("ws", "transport")}

    @routes.get("/__control/websockets")
    async def c_websockets(request):
        now = time.time()
        healthy = any(st["last_seen"] >= now - HEALTH_TIMEOUT for st in em.outpost_states.values())
        return web.json_response({
            "connections": [ws_view(c) for c in em.ws_conns],
            "connected": sum(1 for c in em.ws_conns if c["connected"]),
            "messages": em.ws_messages[-500:],
            "sent": em.sent[-200:],
            "states": em.outpost_states,
            "healthy": healthy,
            "outpost_pk": em.outpost["pk"],
        })

    @routes.post("/__control/token")
    async def c_token(request):
        body = await body_json(request)
        if not isinstance(body.get("token"), str):
            return bad("token required")
        em.token = body["token"]
        em.save()
        return web.json_response({"ok": True})

    @routes.get("/__control/sessions")
    async def c_sessions(request):
        return web.json_response([{"key": k, "sid": sid_for(k), **s} for k, s in em.sessions.items()])

    @routes.get("/__control/oauth_calls")
    async def c_oauth_calls(request):
        calls = em.oauth_calls
        if request.query.get("reset"):
            em.oauth_calls = []
        return web.json_response({"calls": calls})

    @routes.post("/__control/user_attributes")
    async def c_user_attributes(request):
        """{username, attributes}: merged into the user's attributes (ak_proxy.user_attributes)."""
        body = await body_json(request)
        u, attrs = body.get("username"), body.get("attributes")
        if u not in USERS or not isinstance(attrs, dict):
            return bad("username (a known user) and attributes (an object) required")
        USERS[u]["attributes"].update(attrs)
        return web.json_response({"attributes": USERS[u]["attributes"]})

    @routes.post("/__control/app_password")
    async def c_app_password(request):
        body = await body_json(request)
        u, pw = body.get("username"), body.get("password")
        if u not in USERS or not isinstance(pw, str) or not pw:
            return bad("username (a known user) and password required")
        em.app_passwords.setdefault(u, []).append(pw)
        em.save()
        return web.json_response({"ok": True})

    @routes.post("/__control/faults")
    async def c_faults(request):
        body = await body_json(request)
        em.faults = {k: body[k] for k in ("api_status", "api_count", "api_stall_ms") if k in body}
        return web.json_response(em.faults)

    @routes.get("/__control/events")
    async def c_events(request):
        return web.json_response(em.events)

    @routes.get("/__control/users")
    async def c_users(request):
        return web.json_response({u: {"sub": sub_for(u), "password": v["password"],
                                      "claims": user_claims(u, DEFAULT_SCOPES, {})} for u, v in USERS.items()})

    @routes.get("/__control/token_failures")
    async def c_token_failures(request):
        return web.json_response(em.token_failures)

    @routes.get("/__control/tokens")
    async def c_tokens(request):
        return web.json_response([{"token": k, **{kk: vv for kk, vv in v.items() if kk != "session_key"}}
                                  for k, v in em.tokens.items()])

    @routes.get("/__control/outpost")
    async def c_outpost_get(request):
        return web.json_response(em.outpost_json(request))

    @routes.post("/__control/reset")
    async def c_reset(request):
        em.providers = {}
        em.sessions = {}
        em.app_passwords = {}
        em.codes = {}
        em.tokens = {}
        em.interactions = {}
        em.api_calls = []
        em.events = []
        em.ws_messages = []
        em.sent = []
        em.faults = {}
        em.token_failures = []
        em.token = em.initial_token
        em.outpost["config"] = {}
        em.save()
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[api_middleware], client_max_size=16 << 20)
    app.add_routes(routes)
    return app


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default="nginx-authentik-test-token")
    ap.add_argument("--outpost-name", default="nginx outpost")
    ap.add_argument("--state", default=None)
    ap.add_argument("--cert", default=None, help="PEM certificate: serve https (and wss) with it")
    ap.add_argument("--key", default=None, help="its PEM private key")
    args = ap.parse_args()
    ssl_context = None
    if args.cert:
        import ssl
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.cert, args.key)

    em = Emulator(args.token, args.outpost_name, args.state)
    em.save()
    app = build_app(em)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    sys.stdout.write(f"ready {scheme}://{args.host}:{port}/\n")
    sys.stdout.flush()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for c in em.ws_conns:
        tr = c.get("transport")
        if c["connected"] and tr is not None:
            tr.abort()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
