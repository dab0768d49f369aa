"""A hostile OIDC provider for the OpenID RP certification tests (t/test_rp_certification.py).

A small, non-interactive OpenID provider of our own, served by `http.server` in a thread of
the test process, that can misbehave one way at a time.  Standard library only: RS256 is
signed with a pure-Python RSASSA-PKCS1-v1_5 (keys generated here), HS256 with `hmac`.

Endpoints (under the issuer's path, authentik-like: issuer `http://127.0.0.1:PORT/application/o/hostile/`):

    <base>/.well-known/openid-configuration   discovery (issuer = the issuer, exactly)
    <base>/authorize/   no UI: checks client_id / redirect_uri, then 302s straight back to the
                        redirect_uri with `code` and the request's `state`
    <base>/token/       authorization_code grant: checks the client (basic or post), the code,
                        the redirect_uri and the PKCE verifier; answers access_token + id_token
                        (made with the authorize request's `nonce`)
    <base>/userinfo/    Bearer access token -> sub, preferred_username, email, name, groups
    <base>/jwks/        the published keys

Misbehaviours (`hp.misbehave("no-iat")`, one or more; `hp.misbehave()` or `hp.reset()` clears
them; see FAULTS): the id_token's claims, header or signature, the userinfo `sub`, slow or
oversized answers, garbage discovery.  They apply to requests from then on.  Key rotation:
`hp.rotate_key(kid, keep_old=...)` publishes a new key and signs with it from then on.
`hp.client_timeout` is the RP's timeout, where "token-trickle-deadline" puts its burst.
Every request is recorded in `hp.log` (see `hp.hits(endpoint)`; trickled answers add
`trickled` bytes, `trickle_end`, `trickle_seconds`), every id_token answered in `hp.issued`.

Usage:
    hp = HostileProvider().start()
    client = hp.new_client(["http://127.0.0.1:8080"])   # registered; same shape as harness.Provider's
    hp.misbehave("bad-nonce")
    ...
    hp.stop()
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import select
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import callback_url, sub_for

# --- what can go wrong -----------------------------------------------------------------------
FAULTS = {
    # id_token claims
    "no-iat": "id_token without `iat`",
    "wrong-iss": "id_token `iss` is another issuer",
    "aud-untrusted": "id_token `aud` = [client_id, \"untrusted\"], no `azp`",
    "wrong-aud": "id_token `aud` is a single other client",
    "no-sub": "id_token without `sub`",
    "bad-nonce": "id_token `nonce` is not the authorize request's",
    "expired": "id_token `exp` an hour ago",
    # id_token header / signature
    "alg-none": "unsigned id_token, header alg `none`",
    "bad-sig-rs256": "RS256 id_token naming the published kid, signed with another key",
    "hs256": "HS256 id_token signed with the client secret (valid)",
    "bad-sig-hs256": "HS256 id_token signed with a wrong secret",
    "no-kid": "RS256 id_token without `kid` (valid when the JWKS has a single key)",
    "extra-jwks-key": "the JWKS also publishes an unrelated second RSA key",
    # userinfo
    "userinfo-bad-sub": "userinfo `sub` differs from the id_token's",
    # transport
    "token-trickle-headers": "token endpoint sends its whole answer, status line included, one byte every 0.5 s",
    "token-trickle-body": "token endpoint sends its headers, then the body one byte every 0.5 s",
    "token-trickle-deadline": "as token-trickle-body, plus bytes back to back around the client's deadline "
                              "(`client_timeout` after the request)",
    "token-hang": "token endpoint reads the request and never answers",
    "big-discovery": "2 MB discovery document",
    "big-jwks": "2 MB JWKS document",
    "big-token": "2 MB token response",
    "garbage-discovery": "discovery answers 200 application/json that is not JSON",
    "discovery-wrong-issuer": "discovery `issuer` is not the issuer discovery was fetched from",
}

BIG = 2 * 1024 * 1024
TRICKLE_INTERVAL = 0.5
# the first trickled byte comes this long after the request, so that bytes arrive at
# 0.25 s + k * 0.5 s: never just at a whole-second timeout (see _trickle)
TRICKLE_PHASE = 0.25
# token-trickle-deadline: the body is padded to this size (it never completes)
DEADLINE_BODY = 100_000
# a misbehaving answer never holds a connection longer than this
MAX_STALL = 60.0

# kids of the keys besides the signing key: rotation, forged signatures, an extra JWKS key
SPARE_KEYS = ("key-B", "key-forger", "key-extra")

USER = "alice"
USER_CLAIMS = {
    "preferred_username": "alice",
    "email": "alice@example.test",
    "email_verified": True,
    "name": "Alice Liddell",
    "groups": ["admins", "users"],
}


# --- base64url / JWT ---------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def jwt_parts(token: str) -> tuple[dict, dict, bytes]:
    """Header, claims and signature of a JWT, unverified (for test assertions)."""
    h, c, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return (json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(c))),
            base64.urlsafe_b64decode(pad(s)))


# --- RSA (RS256) in pure Python ------------------------------------------------------------------
_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
# DER DigestInfo prefix for SHA-256 (RFC 8017 9.2 note 1)
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _probable_prime(n: int, rounds: int = 32) -> bool:
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        a = secrets.randbelow(n - 3) + 2
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, e: int) -> int:
    while True:
        # top two bits set: p*q has exactly 2*bits bits
        c = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if c % e != 1 and _probable_prime(c):
            return c


class RsaKey:
    """An RSA signing key (2048 bits, e = 65537) with RS256 signing and its public JWK."""

    def __init__(self, kid: str, bits: int = 2048):
        e = 65537
        while True:
            p, q = _prime(bits // 2, e), _prime(bits // 2, e)
            if p != q and (p * q).bit_length() == bits:
                break
        lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
        self.kid = kid
        self.n, self.e, self.d = p * q, e, pow(e, -1, lam)
        self.size = (self.n.bit_length() + 7) // 8
        # self-check: what is signed verifies with the public key
        msg = b"self-check"
        assert pow(int.from_bytes(self.sign(msg), "big"), self.e, self.n) == int.from_bytes(self._em(msg), "big")

    def _em(self, message: bytes) -> bytes:
        t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        return b"\x00\x01" + b"\xff" * (self.size - len(t) - 3) + b"\x00" + t

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.1)."""
        s = pow(int.from_bytes(self._em(message), "big"), self.d, self.n)
        return s.to_bytes(self.size, "big")

    def jwk(self) -> dict:
        n = self.n.to_bytes(self.size, "big")
        e = self.e.to_bytes((self.e.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": b64url(n), "e": b64url(e)}


_KEYS: dict[str, RsaKey] = {}
_KEYS_LOCK = threading.Lock()


def rsa_key(kid: str) -> RsaKey:
    """A key per kid, made once per process (generation takes ~0.3 s)."""
    with _KEYS_LOCK:
        if kid not in _KEYS:
            _KEYS[kid] = RsaKey(kid)
        return _KEYS[kid]


def sign_rs256(claims: dict, key: RsaKey, kid: str | None) -> str:
    header = {"alg": "RS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def sign_hs256(claims: dict, secret: str) -> str:
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT'})}.{b64url_json(claims)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unsigned(claims: dict) -> str:
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims)}."


# --- the server -------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        # a client (nginx) hanging up on a slow or oversized answer is expected
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hostile-oidc/1"
    wbufsize = 0  # unbuffered: trickled bytes leave at once

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hp._dispatch(self)

    def do_POST(self):
        self.server.hp._dispatch(self)


class HostileProvider:
    """The provider; `issuer` = `http://127.0.0.1:<port>` + `path` (e.g. `/application/o/hostile/`)."""

    def __init__(self, path: str = "/application/o/hostile/", key_id: str = "key-A"):
        if path and not path.startswith("/"):
            raise ValueError("path must start with /")
        self.path = path
        self.base_path = path.rstrip("/")
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.faults: set[str] = set()
        self.clients: dict[str, dict] = {}
        self.codes: dict[str, dict] = {}
        self.access_tokens: dict[str, dict] = {}
        self.log: list[dict] = []
        self.issued: list[dict] = []  # every id_token answered: {"id_token", "claims", "header"}
        # every key a misbehaviour may use is made now, not while a request waits for it
        for kid in (key_id, *SPARE_KEYS):
            rsa_key(kid)
        self.signing_key = rsa_key(key_id)
        self.published = [self.signing_key]
        # the RP's `timeout` (seconds), where token-trickle-deadline puts its burst
        self.client_timeout = 2.0
        self.server = None
        self.thread = None

    # -- lifecycle --
    def start(self) -> "HostileProvider":
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.hp = self
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.issuer = self.origin + self.path
        self.issuer_base = self.origin + self.base_path
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name=f"hostile-oidc-{self.port}", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def alive(self) -> bool:
        return self.server is not None

    # -- test controls --
    def misbehave(self, *names: str) -> "HostileProvider":
        unknown = [n for n in names if n not in FAULTS]
        if unknown:
            raise ValueError(f"unknown misbehaviour(s) {unknown}; known: {sorted(FAULTS)}")
        with self.lock:
            self.faults = set(names)
        return self

    def reset(self):
        with self.lock:
            self.faults = set()
            self.log.clear()

    def rotate_key(self, kid: str = "key-B", keep_old: bool = True) -> RsaKey:
        """Sign with a new key from now on; publish it (with the old one if `keep_old`)."""
        new = rsa_key(kid)
        with self.lock:
            self.published = ([*self.published] if keep_old else []) + [new]
            self.signing_key = new
        return new

    def new_client(self, origins, client_id: str | None = None, **_ignored) -> dict:
        """A confidential client whose redirect URIs are the nginx callback on each origin."""
        if isinstance(origins, str):
            origins = [origins]
        client = {
            "client_id": client_id or "rp-" + os.urandom(6).hex(),
            "client_secret": os.urandom(32).hex(),
            "redirect_uris": [callback_url(o) for o in origins],
        }
        with self.lock:
            self.clients[client["client_id"]] = client
        return client

    # -- what happened --
    def hits(self, endpoint: str) -> list[dict]:
        """Logged requests to `endpoint`: discovery, authorize, token, userinfo or jwks."""
        with self.lock:
            return [e for e in self.log if e["endpoint"] == endpoint]

    def discovery(self) -> dict:
        return self._discovery_doc()

    # -- documents --
    def url(self, name: str) -> str:
        return f"{self.issuer_base}/{name}/"

    def _discovery_doc(self) -> dict:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.url("authorize"),
            "token_endpoint": self.url("token"),
            "userinfo_endpoint": self.url("userinfo"),
            "jwks_uri": self.url("jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "HS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid", "profile", "email"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", *USER_CLAIMS],
        }

    def _jwks_doc(self, faults) -> dict:
        keys = [k.jwk() for k in self.published]
        if "extra-jwks-key" in faults:
            keys.append(rsa_key("key-extra").jwk())
        return {"keys": keys}

    def _id_token(self, faults, client: dict, nonce: str, now: int) -> tuple[str, dict]:
        client_id = client["client_id"]
        claims = {
            "iss": self.issuer,
            "sub": sub_for(USER),
            "aud": client_id,
            "exp": now + 300,
            "iat": now,
            "auth_time": now,
            "nonce": nonce,
            "preferred_username": USER_CLAIMS["preferred_username"],
        }
        if "no-iat" in faults:
            del claims["iat"]
        if "wrong-iss" in faults:
            claims["iss"] = self.origin + "/application/o/evil/"
        if "aud-untrusted" in faults:
            claims["aud"] = [client_id, "untrusted"]
        if "wrong-aud" in faults:
            claims["aud"] = "some-other-client"
        if "no-sub" in faults:
            del claims["sub"]
        if "bad-nonce" in faults:
            claims["nonce"] = "not-" + nonce
        if "expired" in faults:
            claims["exp"], claims["iat"], claims["auth_time"] = now - 3600, now - 3900, now - 3900
        with self.lock:
            key = self.signing_key
        if "alg-none" in faults:
            token = unsigned(claims)
        elif "hs256" in faults:
            token = sign_hs256(claims, client["client_secret"])
        elif "bad-sig-hs256" in faults:
            token = sign_hs256(claims, "wrong-" + client["client_secret"])
        elif "bad-sig-rs256" in faults:
            token = sign_rs256(claims, rsa_key("key-forger"), key.kid)
        elif "no-kid" in faults:
            token = sign_rs256(claims, key, None)
        else:
            token = sign_rs256(claims, key, key.kid)
        return token, claims

    # -- HTTP --
    def _dispatch(self, h: _Handler):
        url = urllib.parse.urlsplit(h.path)
        path = url.path
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        form = dict(urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)) \
            if h.command == "POST" else {}
        routes = {
            f"{self.base_path}/.well-known/openid-configuration": ("discovery", self._do_discovery),
            f"{self.base_path}/authorize/": ("authorize", self._do_authorize),
            f"{self.base_path}/token/": ("token", self._do_token),
            f"{self.base_path}/userinfo/": ("userinfo", self._do_userinfo),
            f"{self.base_path}/jwks/": ("jwks", self._do_jwks),
        }
        endpoint, handler = routes.get(path, ("unknown", None))
        entry = {"endpoint": endpoint, "method": h.command, "path": path, "query": query, "form": form,
                 "headers": {k.lower(): v for k, v in h.headers.items()}, "time": time.monotonic(),
                 "peer": h.client_address}
        h.log_entry = entry
        with self.lock:
            faults = set(self.faults)
            self.log.append(entry)
        try:
            if handler is None:
                return self._send(h, 404, {"error": "not_found"})
            handler(h, faults, query, form)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            h.close_connection = True

    def _send(self, h, status: int, body, ctype: str = "application/json", headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _padded(doc: dict) -> bytes:
        """`doc` as JSON with a padding member making it 2 MB (valid JSON, just too big)."""
        return json.dumps({**doc, "padding": "x" * BIG}).encode()

    def _do_discovery(self, h, faults, query, form):
        doc = self._discovery_doc()
        if "discovery-wrong-issuer" in faults:
            doc["issuer"] = self.origin + "/application/o/other/"
        if "garbage-discovery" in faults:
            return self._send(h, 200, b'{"issuer": "' + self.issuer.encode() + b'", <html>oops</html>')
        if "big-discovery" in faults:
            return self._send(h, 200, self._padded(doc))
        self._send(h, 200, doc)

    def _do_jwks(self, h, faults, query, form):
        doc = self._jwks_doc(faults)
        if "big-jwks" in faults:
            return self._send(h, 200, self._padded(doc), "application/jwk-set+json")
        self._send(h, 200, doc, "application/jwk-set+json")

    def _do_authorize(self, h, faults, query, form):
        with self.lock:
            client = self.clients.get(query.get("client_id", ""))
        redirect_uri = query.get("redirect_uri", "")
        if client is None or redirect_uri not in client["redirect_uris"]:
            return self._send(h, 400, b"unknown client or redirect_uri", "text/plain")
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.codes[code] = {"client_id": client["client_id"], "redirect_uri": redirect_uri,
                                "nonce": query.get("nonce", ""), "scope": query.get("scope", ""),
                                "code_challenge": query.get("code_challenge"),
                                "code_challenge_method": query.get("code_challenge_method")}
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        sep = "&" if "?" in redirect_uri else "?"
        h.send_response(302)
        h.send_header("Location", redirect_uri + sep + urllib.parse.urlencode(params))
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _client_auth(self, h, form) -> tuple[dict | None, str]:
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None, "basic"
            cid, secret = urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(secret)
            method = "client_secret_basic"
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
            method = "client_secret_post"
        with self.lock:
            client = self.clients.get(cid)
        if client is None or not hmac.compare_digest(client["client_secret"], secret):
            return None, method
        return client, method

    def _do_token(self, h, faults, query, form):
        if "token-hang" in faults:
            return self._hang(h)
        client, method = self._client_auth(h, form)
        h.log_entry["auth_method"] = method
        if client is None:
            return self._send(h, 401, {"error": "invalid_client"})
        with self.lock:
            grant = self.codes.pop(form.get("code", ""), None)
        if form.get("grant_type") != "authorization_code" or grant is None \
                or grant["client_id"] != client["client_id"] or grant["redirect_uri"] != form.get("redirect_uri"):
            return self._send(h, 400, {"error": "invalid_grant"})
        if grant["code_challenge"] is not None:
            verifier = form.get("code_verifier", "")
            if grant["code_challenge_method"] != "S256" or \
                    b64url(hashlib.sha256(verifier.encode()).digest()) != grant["code_challenge"]:
                return self._send(h, 400, {"error": "invalid_grant", "error_description": "PKCE"})
        now = int(time.time())
        id_token, claims = self._id_token(faults, client, grant["nonce"], now)
        access_token = secrets.token_urlsafe(32)
        with self.lock:
            self.access_tokens[access_token] = {"sub": sub_for(USER), "client_id": client["client_id"]}
            self.issued.append({"id_token": id_token, "claims": claims})
        doc = {"access_token": access_token, "token_type": "Bearer", "expires_in": 300, "id_token": id_token,
               "scope": grant["scope"]}
        if "big-token" in faults:
            return self._send(h, 200, self._padded(doc))
        if "token-trickle-headers" in faults or "token-trickle-body" in faults:
            return self._trickle(h, json.dumps(doc).encode(), headers_too="token-trickle-headers" in faults)
        if "token-trickle-deadline" in faults:
            body = json.dumps(doc).encode()
            body += b" " * max(0, DEADLINE_BODY - len(body))  # JSON allows trailing whitespace
            return self._trickle(h, body, headers_too=False, burst_at=self.client_timeout)
        self._send(h, 200, doc)

    def _do_userinfo(self, h, faults, query, form):
        auth = h.headers.get("Authorization", "")
        with self.lock:
            grant = self.access_tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if grant is None:
            return self._send(h, 401, {"error": "invalid_token"},
                              headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        info = {"sub": grant["sub"], **USER_CLAIMS}
        if "userinfo-bad-sub" in faults:
            info["sub"] = sub_for("mallory")
        self._send(h, 200, info)

    # -- slow answers --
    def _trickle(self, h, body: bytes, headers_too: bool, burst_at: float | None = None):
        """Send the answer one byte every TRICKLE_INTERVAL, the first TRICKLE_PHASE after the
        request arrived; the status line and headers too if `headers_too`.  With `burst_at`,
        bytes are also sent back to back from 20 ms before to 30 ms after `burst_at` seconds
        after the request.

        The 0.25 s phase keeps the bytes away from whole seconds, i.e. from the client's
        deadline (its `timeout` after the request), so the plain trickle tests a slow answer and
        nothing more.  The burst puts bytes on the wire at the very moment of the deadline: a
        client that enforces its deadline only through per-read socket timeouts gets a byte
        just past it and goes on (ureq 3.2 then allows 1 s per read, so a byte every 0.5 s
        keeps it reading for ever).
        """
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Cache-Control: no-store\r\n\r\n").encode()
        h.close_connection = True
        h.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each byte on its own
        entry = h.log_entry
        start = entry["time"]  # when the request was read
        entry["trickled"] = 0
        if headers_too:
            data = head + body
        else:
            h.wfile.write(head)
            data = body
        burst = (start + burst_at - 0.02, start + burst_at + 0.03) if burst_at is not None else None
        next_at = start + TRICKLE_PHASE
        i = 0
        try:
            while i < len(data):
                now = time.monotonic()
                if self.stopping.is_set() or now > start + MAX_STALL:
                    entry["trickle_end"] = "stopped"
                    return
                in_burst = burst is not None and burst[0] <= now <= burst[1]
                if not in_burst:
                    wake = next_at
                    if burst is not None and now < burst[0]:
                        wake = min(wake, burst[0])
                    if wake > now:
                        if wake - now > 0.01:
                            self.stopping.wait(wake - now - 0.005)  # wakes early; spin the rest
                        else:
                            while time.monotonic() < wake:
                                pass
                        continue
                    next_at += TRICKLE_INTERVAL
                    if next_at < now:
                        next_at = now + TRICKLE_INTERVAL
                h.wfile.write(data[i:i + 1])
                i += 1
                entry["trickled"] = i
            entry["trickle_end"] = "complete"
        except OSError as e:
            entry["trickle_end"] = f"client hung up ({e.__class__.__name__})"
        finally:
            entry["trickle_seconds"] = round(time.monotonic() - start, 2)

    def _hang(self, h):
        """Never answer; return when the client hangs up (or at stop / MAX_STALL)."""
        h.close_connection = True
        sock = h.connection
        deadline = time.monotonic() + MAX_STALL
        while not self.stopping.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        return
                except OSError:
                    return
                time.sleep(0.2)
