#!/usr/bin/env python3
"""The sample app of `make demo`: shows the identity nginx-authentik hands it.

A browser navigation (Accept: text/html) gets an HTML page: who you are (username, name,
email, groups, entitlements), every other X-authentik-* header in a small table, which
cookies reached the app (never the module's session cookie), links to sign out and to an
unauthenticated path, and a WebSocket echo over the same session.  API clients
(Accept: application/json, or anything that does not ask for HTML) get the request as JSON,
like t/upstream.py.

  /ws        WebSocket echo: the first message is {"type": "hello", "user": ...}, then every
             text message comes back as is
  /public/*  the unauthenticated path of the demo config: a page that says so

Usage: demo_app.py [--host 127.0.0.1] [--port 0]; prints `ready <port>` when listening.
"""

import argparse
import asyncio
import html
import json
import signal
import sys

from aiohttp import WSMsgType, web

SIGN_OUT = "/outpost.goauthentik.io/sign_out"
PUBLIC = "/public/"
# The module's session cookie is authentik_proxy_<8 hex digits> (see README, Behaviour).
SESSION_COOKIE_PREFIX = "authentik_proxy_"
IDENTITY = [
    ("Username", "X-authentik-username"),
    ("Name", "X-authentik-name"),
    ("Email", "X-authentik-email"),
]
LISTS = [
    ("Groups", "X-authentik-groups"),
    ("Entitlements", "X-authentik-entitlements"),
]

STYLE = """
body{font-family:system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em;color:#1d2430}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.6em}
.sub{color:#5a6472;margin-top:0}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:.3em .6em;border-bottom:1px solid #e2e6eb;vertical-align:top}
th{width:14em;font-weight:600} code{font-size:.9em;word-break:break-all}
.tag{display:inline-block;background:#e8eefc;border-radius:.8em;padding:.05em .6em;margin:0 .3em .2em 0}
.ok{color:#17733a;font-weight:600} .bad{color:#b3261e;font-weight:600}
nav a{margin-right:1.2em} #ws-log{background:#f4f6f8;padding:.6em;min-height:3em;white-space:pre-wrap}
"""

WS_SCRIPT = """
(function () {
  var log = document.getElementById("ws-log");
  var status = document.getElementById("ws-status");
  var form = document.getElementById("ws-form");
  var input = document.getElementById("ws-input");
  function line(text) { log.textContent += text + "\\n"; }
  var ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  ws.onopen = function () { status.textContent = "connected"; status.className = "ok"; };
  ws.onclose = function () { status.textContent = "closed"; status.className = "bad"; };
  ws.onmessage = function (ev) {
    var msg = ev.data;
    try {
      var hello = JSON.parse(msg);
      if (hello && hello.type === "hello") { line("server: hello " + hello.user); return; }
    } catch (e) {}
    line("echo: " + msg);
  };
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (ws.readyState === WebSocket.OPEN && input.value) { ws.send(input.value); line("sent: " + input.value); }
  });
})();
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _headers(request):
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]


def _describe(request):
    raw_path = request.raw_path
    path, _, query = raw_path.partition("?")
    return {
        "method": request.method,
        "path": path,
        "query": query,
        "raw_path": raw_path,
        "version": "%d.%d" % (request.version.major, request.version.minor),
        "headers": _headers(request),
    }


def wants_html(request) -> bool:
    """A browser navigation: Accept names text/html before (or instead of) JSON."""
    accept = request.headers.get("Accept", "").lower()
    if "text/html" not in accept:
        return False
    return "application/json" not in accept or accept.index("text/html") < accept.index("application/json")


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def _cookie_section(request) -> str:
    names = sorted(request.cookies.keys())
    leaked = [n for n in names if n.startswith(SESSION_COOKIE_PREFIX)]
    if leaked:
        verdict = (f'<p id="session-cookie" class="bad">The session cookie {_esc(", ".join(leaked))} '
                   "reached the app.</p>")
    else:
        verdict = ('<p id="session-cookie" class="ok">The session cookie (authentik_proxy_&hellip;) never reached '
                   "the app: nginx removed it from the request.</p>")
    received = ", ".join(f"<code>{_esc(n)}</code>" for n in names) or "none"
    note = ""
    if any(n.startswith("_session") for n in names):
        note = " (<code>_session</code> is the demo provider's own: browsers share cookies across the ports of a host)"
    return (f"<h2>Cookies</h2>\n{verdict}\n<p>Cookies the app received: <span id=\"cookies\">{received}</span>"
            f"{note}</p>\n")


def identity_page(request) -> str:
    h = request.headers
    user = h.get("X-authentik-username", "")
    rows = []
    for label, name in IDENTITY:
        rows.append(f'<tr><th>{label}</th><td id="{name.lower()}">{_esc(h.get(name, ""))}</td></tr>')
    for label, name in LISTS:
        tags = " ".join(f'<span class="tag">{_esc(v)}</span>' for v in h.get(name, "").split("|") if v)
        rows.append(f'<tr><th>{label}</th><td id="{name.lower()}">{tags or "&mdash;"}</td></tr>')
    shown = {name.lower() for _, name in IDENTITY + LISTS}
    others = []
    for name, value in _headers(request):
        if name.lower().startswith("x-authentik-") and name.lower() not in shown:
            short = value if len(value) <= 120 else value[:117] + "..."
            others.append(f'<tr><th><code>{_esc(name)}</code></th><td><code>{_esc(short)}</code></td></tr>')
    if user:
        heading = f'<h1>Hello, <span id="whoami">{_esc(h.get("X-authentik-name") or user)}</span></h1>'
        intro = ('<p class="sub">You are logged in. nginx checked your session and sent this app who you are '
                 "in <code>X-authentik-*</code> headers.</p>")
    else:
        heading = '<h1>No identity</h1>'
        intro = '<p class="sub">This request carried no <code>X-authentik-*</code> headers.</p>'
    body = [
        heading, intro,
        f'<nav><a id="sign-out" href="{SIGN_OUT}">Sign out</a>'
        f'<a id="public" href="{PUBLIC}">A page without login</a></nav>',
        "<h2>Who you are</h2>",
        f'<table id="identity">{"".join(rows)}</table>',
        "<h2>The other identity headers</h2>",
        f'<table id="headers">{"".join(others) or "<tr><td>none</td></tr>"}</table>',
        _cookie_section(request),
        '<p>API clients get the same request as JSON: <code>Accept: application/json</code>.</p>',
        "<h2>WebSocket</h2>",
        '<p>An echo over <code>/ws</code>, a protected location: the upgrade passed the same login. '
        'Status: <span id="ws-status">connecting</span></p>',
        '<form id="ws-form"><input id="ws-input" value="hello from the browser" size="30"> '
        '<button type="submit" id="ws-send">Send</button></form>',
        '<pre id="ws-log"></pre>',
        f"<script>{WS_SCRIPT}</script>",
    ]
    return _page(f"nginx-authentik demo: {user or 'no identity'}", "\n".join(body) + "\n")


def public_page(request) -> str:
    who = request.headers.get("X-authentik-username")
    body = [
        "<h1>A page without login</h1>",
        '<p class="sub">This path is in <code>unauth_paths</code>: nginx lets everyone through. With a '
        "session the app still gets your identity; without one it gets none (forged identity headers are "
        "removed).</p>",
        f'<p id="public-identity">X-authentik-username: {_esc(who) if who else "(none)"}</p>',
        '<nav><a href="/">Back to the protected page</a></nav>',
    ]
    return _page("nginx-authentik demo: public", "\n".join(body) + "\n")


async def websocket(request):
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    await ws.send_str(json.dumps({"type": "hello", "user": request.headers.get("X-authentik-username", ""),
                                  **_describe(request)}))
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
    return ws


async def handle(request):
    if request.path == "/ws" and request.headers.get("Upgrade", "").lower() == "websocket":
        return await websocket(request)
    body = await request.read()
    if request.method in ("GET", "HEAD") and wants_html(request):
        page = public_page(request) if request.path.startswith(PUBLIC) else identity_page(request)
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})
    data = _describe(request)
    data["body_length"] = len(body)
    return web.json_response(data)


async def main(host, port):
    app = web.Application(client_max_size=1 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           handler_args={"max_field_size": 65536, "max_line_size": 65536})
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    print("ready %d" % site._server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    try:
        asyncio.run(main(a.host, a.port))
    except KeyboardInterrupt:
        sys.exit(0)
