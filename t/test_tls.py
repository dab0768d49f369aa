"""The login flow the way sites are deployed: `listen ... ssl http2` with a throwaway
certificate made here (openssl), an https external_host (or none: the scheme then comes from
the TLS request), `Secure` on every cookie the module sets, the https redirect URI, sessions
used over HTTP/2 and HTTP/1.1, unauthenticated paths and forged identity headers over HTTP/2."""

import json
import socket
import ssl
import subprocess
import time

import pytest
import websocket

from harness import (CALLBACK_PATH, OUTPOST, XHR_HEADERS, Browser, callback_url, echo, is_login_form,
                     parse_set_cookie, query_of, session_cookie_name, sub_for)

HOST = "app.authentik.test"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for app.authentik.test and 127.0.0.1, valid for a day."""
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={HOST}",
                    "-addext", f"subjectAltName=DNS:{HOST},IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return crt, key


class TlsApp:
    def __init__(self, app, cert, external_host: bool):
        self.app = app
        self.cert, self.key = cert
        self.port = app.nginx.port
        self.origin = f"https://{HOST}:{self.port}"
        app.client = app.new_client([self.origin])
        app.start(external_host=self.origin if external_host else None,
                  listen_extra="ssl http2",
                  provider_extra="unauth_paths ^/public/;",
                  server_extra=f"""ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    add_header X-Client-Protocol $server_protocol always;""")

    def url(self, path="/"):
        return self.origin + path

    def browser(self) -> Browser:
        b = Browser()
        b.s.verify = str(self.cert)
        return b

    def module_cookies(self, hops) -> list:
        """Every Set-Cookie the module sent during `hops` (answers from nginx, not the provider)."""
        return [parse_set_cookie(raw) for h in hops if h.url.startswith(self.origin) for raw in h.set_cookie]


@pytest.fixture(params=["https-external-host", "no-external-host"])
def tls(request, app, cert):
    return TlsApp(app, cert, external_host=request.param == "https-external-host")


def h2_request(tls: TlsApp, path: str, headers: list | None = None, method: str = "GET"):
    """One request over HTTP/2 (TLS, ALPN h2) on a new connection: (status, headers, body)."""
    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.create_default_context(cafile=str(tls.cert))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", tls.port), timeout=15)
    with ctx.wrap_socket(raw, server_hostname=HOST) as sock:
        assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", method), (":path", path), (":scheme", "https"),
                                (":authority", f"{HOST}:{tls.port}"),
                                *[(k.lower(), v) for k, v in (headers or [])]], end_stream=True)
        sock.sendall(conn.data_to_send())
        status, resp_headers, body, ended = None, [], b"", False
        deadline = time.monotonic() + 15
        while not ended and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    resp_headers = [(k, v) for k, v in ev.headers]
                    status = int(dict(resp_headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    ended = True
            sock.sendall(conn.data_to_send())
        assert ended, f"no complete HTTP/2 answer for {path}"
        return status, resp_headers, body


def header_values(headers, name):
    return [v for k, v in headers if k.lower() == name.lower()]


def echoed(body: bytes) -> dict:
    """The upstream's echo (t/upstream.py) as {lowercased header name: [values]}."""
    data = json.loads(body)
    out = {}
    for k, v in data["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def login(tls: TlsApp, b: Browser, path="/"):
    r = b.get(tls.url(path))
    assert is_login_form(r), (r.status_code, r.url, b.hops)
    hops = list(b.hops)
    r = b.submit_login(r, "alice")
    hops += b.hops
    assert r.status_code == 200 and r.url == tls.url(path), (r.status_code, r.url, b.hops)
    return r, hops


def test_login_over_tls_secure_cookies_and_https_redirect_uri(tls):
    b = tls.browser()
    r = b.get(tls.url("/deep/page?x=1"), follow=False)
    assert r.status_code == 302 and r.headers["X-Client-Protocol"] == "HTTP/1.1"
    q = query_of(r.headers["Location"])
    assert q["redirect_uri"] == callback_url(tls.origin)
    assert q["redirect_uri"].startswith("https://")

    r, hops = login(tls, b, "/deep/page?x=1")
    e = echo(r)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-uid") == sub_for("alice")
    # the callback went to the https redirect URI
    assert any(h.url.startswith(tls.origin + CALLBACK_PATH) for h in hops), [h.url for h in hops]

    cookies = tls.module_cookies(hops)
    name = session_cookie_name(tls.app.client["client_id"])
    # the login binding cookie (set, then expired at the callback) and the session cookie
    assert [c for c in cookies if c.name == name and c.value], [c.raw for c in cookies]
    assert len([c for c in cookies if c.name.startswith(name + "_login_")]) == 2, [c.raw for c in cookies]
    for c in cookies:
        assert c.has("secure"), c.raw
        assert c.has("httponly"), c.raw

    # sign-out expires the session cookie, Secure as well, and goes to the provider's logout
    r = b.get(tls.url(f"{OUTPOST}/sign_out"), follow=False)
    assert r.status_code == 302
    assert query_of(r.headers["Location"])["post_logout_redirect_uri"] == tls.origin + "/"
    expired = [parse_set_cookie(raw) for raw in r.raw.headers.getlist("Set-Cookie")]
    assert [c for c in expired if c.name == name], [c.raw for c in expired]
    for c in expired:
        assert c.has("secure"), c.raw


def test_session_over_http2_and_http11(tls):
    b = tls.browser()
    login(tls, b)
    name = session_cookie_name(tls.app.client["client_id"])
    value = b.cookie(name)
    assert value

    # HTTP/1.1 over TLS, with the session
    r = b.get(tls.url("/h1"), headers=XHR_HEADERS, follow=False)
    assert r.status_code == 200 and r.headers["X-Client-Protocol"] == "HTTP/1.1"
    assert echo(r).get("X-authentik-username") == "alice"

    # HTTP/2, with the same session: the identity reaches the app, the cookie does not
    status, headers, body = h2_request(tls, "/h2?a=1", [("cookie", f"{name}={value}"), ("cookie", "other=1"),
                                                        ("accept", "application/json")])
    assert status == 200, (status, body[:300])
    assert header_values(headers, "x-client-protocol") == ["HTTP/2.0"]
    got = echoed(body)
    assert got["x-authentik-username"] == ["alice"]
    assert got["x-authentik-groups"] == ["admins|users"]
    assert json.loads(body)["raw_path"] == "/h2?a=1"
    assert not any(name in c for c in got.get("cookie", [])), got.get("cookie")
    assert any("other=1" in c for c in got.get("cookie", [])), got.get("cookie")

    # HTTP/2 without a session: a navigation is sent to the provider with the https redirect
    # URI; an API client gets 401
    status, headers, _ = h2_request(tls, "/h2/nav", [("accept", "text/html"), ("sec-fetch-mode", "navigate")])
    assert status == 302
    loc = header_values(headers, "location")[0]
    assert query_of(loc)["redirect_uri"] == callback_url(tls.origin)
    assert all("secure" in c.lower() for c in header_values(headers, "set-cookie")), headers
    assert header_values(headers, "set-cookie"), headers
    status, _, _ = h2_request(tls, "/h2/api", [("accept", "application/json"), ("sec-fetch-mode", "cors")])
    assert status == 401

    # an unknown session id is expired by the module, with a Secure cookie too (both protocols)
    bogus = f"{name}=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    status, headers, _ = h2_request(tls, "/h2/api", [("cookie", bogus), ("accept", "application/json")])
    expired = [parse_set_cookie(v) for v in header_values(headers, "set-cookie")]
    assert status == 401 and [c for c in expired if c.name == name and c.attr("max-age") == "0"], headers
    assert all(c.has("secure") for c in expired), [c.raw for c in expired]
    r = tls.browser().get(tls.url("/h1/api"), headers={**XHR_HEADERS, "Cookie": bogus}, follow=False)
    expired = [parse_set_cookie(v) for v in r.raw.headers.getlist("Set-Cookie")]
    assert r.status_code == 401 and [c for c in expired if c.name == name and c.attr("max-age") == "0"]
    assert all(c.has("secure") for c in expired), [c.raw for c in expired]

    # a WebSocket over TLS (HTTP/1.1 upgrade) with the session
    ws = websocket.create_connection(f"wss://127.0.0.1:{tls.port}/ws", host=f"{HOST}:{tls.port}",
                                     cookie=f"{name}={value}", timeout=15,
                                     sslopt={"ca_certs": str(tls.cert), "server_hostname": HOST})
    try:
        hello = json.loads(ws.recv())
        assert dict((k.lower(), v) for k, v in hello["headers"])["x-authentik-username"] == "alice"
        ws.send("over tls")
        assert ws.recv() == "over tls"
    finally:
        ws.close()


FORGED = [("x-authentik-username", "mallory"), ("x-authentik-groups", "admins"),
          ("x-authentik-email", "mallory@evil.test"), ("x-authentik-uid", "0")]


def test_unauth_paths_and_forged_headers_over_http2(tls):
    # an unauthenticated path: served without a session, forged identity headers removed
    status, _, body = h2_request(tls, "/public/page", [("accept", "text/html"), *FORGED])
    assert status == 200, (status, body[:300])
    got = echoed(body)
    assert not [k for k in got if k.startswith("x-authentik-")], got
    assert "mallory" not in body.decode()

    # `auth_authentik off`: nothing to do with the module (no login, headers left alone)
    status, _, body = h2_request(tls, "/open/x", [("accept", "application/json")])
    assert status == 200

    # a protected path with a session and forged headers: the module's identity wins, the
    # forged values never reach the app
    b = tls.browser()
    login(tls, b)
    name = session_cookie_name(tls.app.client["client_id"])
    status, _, body = h2_request(tls, "/private", [("cookie", f"{name}={b.cookie(name)}"),
                                                   ("accept", "application/json"), *FORGED,
                                                   ("X-Authentik-Username", "mallory2")])
    assert status == 200
    got = echoed(body)
    assert got["x-authentik-username"] == ["alice"]
    assert got["x-authentik-uid"] == [sub_for("alice")]
    assert got["x-authentik-groups"] == ["admins|users"]
    assert "mallory" not in body.decode()

    # on the unauthenticated path a session still brings the real identity over HTTP/2
    status, _, body = h2_request(tls, "/public/me", [("cookie", f"{name}={b.cookie(name)}"), *FORGED])
    assert status == 200
    got = echoed(body)
    assert got["x-authentik-username"] == ["alice"]
    assert "mallory" not in body.decode()

    # forged headers without a session on a protected path: never forwarded (401/302)
    status, _, body = h2_request(tls, "/private", [("accept", "application/json"), *FORGED])
    assert status == 401 and b"mallory" not in body
    # the module's own endpoints over HTTP/2
    status, _, _ = h2_request(tls, f"{OUTPOST}/ping")
    assert status == 204
