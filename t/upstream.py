#!/usr/bin/env python3
"""Upstream echo server for nginx-authentik's end-to-end tests and `make demo`.

Any path: 200 application/json
    {"method": ..., "path": ..., "query": ..., "raw_path": ..., "version": "1.1",
     "headers": [[name, value], ...]}
with the request line and the headers exactly as received (names in received case,
duplicates preserved, in order).

/ws with a WebSocket upgrade: WebSocket echo.  The first message sent by the server
is JSON {"type": "hello", "path": ..., "headers": [[name, value], ...]}; after that
every text message is echoed back as is, binary messages too.

Usage: upstream.py [--host 127.0.0.1] [--port 0]; prints `ready <port>` when listening.
"""

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import WSMsgType, web


def _headers(request):
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]


def _describe(request):
    raw_path = request.raw_path  # as on the request line, not decoded
    path, _, query = raw_path.partition("?")
    return {
        "method": request.method,
        "path": path,
        "query": query,
        "raw_path": raw_path,
        "version": "%d.%d" % (request.version.major, request.version.minor),
        "headers": _headers(request),
    }


async def websocket(request):
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    await ws.send_str(json.dumps({"type": "hello", **_describe(request)}))
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
    data = _describe(request)
    data["body_length"] = len(body)
    return web.json_response(data)


def make_app():
    app = web.Application(client_max_size=16 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def main(host, port):
    runner = web.AppRunner(
        make_app(),
        access_log=None,
        handle_signals=False,
        # generous limits: identity headers (a JWT) can be long
        handler_args={"max_field_size": 65536, "max_line_size": 65536},
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print("ready %d" % bound, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
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
