#!/usr/bin/env python3
"""`make demo`: nginx + ngx_http_authentik_module + a local OIDC provider + a sample app.

  provider   http://127.0.0.1:9000   (t/provider/server.mjs, users alice and bob)
  app        http://127.0.0.1:<free> (t/demo_app.py: a page of the identity it receives)
  nginx      http://127.0.0.1:8080   (Debian's /usr/sbin/nginx + build/ngx_http_authentik_module.so)

Open http://127.0.0.1:8080/ and log in as alice / alice-password: the page shows who you
are, as the app received it (X-authentik-username, -groups, ...), and a WebSocket echo.
Ctrl-C, SIGTERM and SIGHUP stop everything (each child runs in a process group of its own,
which is stopped whole); so does the end of the parent process (`make`).
A port in use is reported in one line before anything starts.
Options: --nginx PATH --module PATH --port 8080 --provider-port 9000 --authentik oidc|emulator
(env DEMO_NGINX, DEMO_MODULE, DEMO_PORT, DEMO_PROVIDER_PORT, DEMO_AUTHENTIK).

`--authentik emulator` (`make demo AUTHENTIK=emulator`): instead of the generic OIDC provider,
the test suite's authentik emulator (t/authentik_emulator.py) on the provider port, and nginx
as its outpost: `authentik_outpost` + `auth_authentik demo` (the application's slug), the
provider fetched from the emulator's outpost API.
"""

import argparse
import ctypes
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import Authentik, Nginx, Provider, Upstream  # noqa: E402

# The example configuration (it doubles as documentation of the module's directives).
EXAMPLE_CONF = r"""
# Sessions live in shared memory, shared by all workers; they survive `nginx -s reload`.
authentik_session_zone zone=authentik:16m timeout=24h;

authentik_provider demo {
    issuer        @ISSUER@;            # discovery: <issuer>/.well-known/openid-configuration
    client_id     @CLIENT_ID@;
    client_secret @CLIENT_SECRET@;     # or: client_secret_file /etc/nginx/authentik-demo.secret;
    external_host http://127.0.0.1:@PORT@;
    mode          proxy;               # proxy | forward_single | forward_domain
    scopes        openid profile email entitlements ak_proxy;
    unauth_paths  ^/public/ ^/health$; # no login needed (regexes on the path)
    timeout       10s;                 # each call to the provider
    # post_logout_redirect http://127.0.0.1:@PORT@/;   # default: <external_host>/
}

server {
    listen 127.0.0.1:@PORT@;
    server_name localhost;

    # the sample app, behind the login; it receives X-authentik-* headers
    location / {
        auth_authentik demo;
        proxy_pass http://127.0.0.1:@UPSTREAM_PORT@;
    }

    # WebSockets work through the same session
    location /ws {
        auth_authentik demo;
        proxy_pass http://127.0.0.1:@UPSTREAM_PORT@;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
    }

    # not protected at all
    location = /robots.txt {
        auth_authentik off;
        return 200 "User-agent: *\nDisallow: /\n";
    }

    # the module's variables can be used anywhere nginx takes variables
    add_header X-Demo-User $authentik_username always;
    authentik_unauth_paths ^/favicon\.ico$;
}
"""

# The same demo with nginx as an authentik outpost: the provider comes from authentik's API.
OUTPOST_CONF = r"""
authentik_session_zone zone=authentik:16m;

# nginx is the outpost this token belongs to; its providers come from authentik's API and
# follow every change there (websocket), without a reload.
authentik_outpost @AUTHENTIK@ token_file=@TOKEN_FILE@;

server {
    listen 127.0.0.1:@PORT@;
    server_name localhost;

    location / {
        auth_authentik demo;           # the application's slug in authentik (or "auto")
        proxy_pass http://127.0.0.1:@UPSTREAM_PORT@;
    }
    location /ws {
        auth_authentik demo;
        proxy_pass http://127.0.0.1:@UPSTREAM_PORT@;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
    }
    add_header X-Demo-User $authentik_username always;
}
"""


def port_in_use(port: int) -> bool:
    """True when 127.0.0.1:<port> cannot be bound (another listener, on it or on 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def next_free_port(port: int, taken: set[int]) -> int:
    for candidate in range(port + 1, min(port + 200, 65536)):
        if candidate not in taken and not port_in_use(candidate):
            return candidate
    return 0


def busy_ports_message(ports: list[tuple[int, str, str]]) -> str | None:
    """One line for the first port in use: which, what needs it, and how to pick another."""
    wanted = {p for p, _, _ in ports}
    for port, what, env in ports:
        if port_in_use(port):
            other = next_free_port(port, wanted)
            hint = f"{env}={other} make demo" if other else f"{env}=<port> make demo"
            return f"demo: port {port} ({what}) is in use; pick another: {hint}"
    return None


def die_with_parent(parent: int):
    """Get SIGTERM when the parent (make, a shell) ends, so the demo never outlives it (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def env_port(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        sys.exit(f"demo: {name}={value!r} is not a port number")


def main():
    parent = os.getppid()
    ap = argparse.ArgumentParser(description="nginx-authentik demo")
    ap.add_argument("--nginx", default=os.environ.get("DEMO_NGINX", "/usr/sbin/nginx"))
    ap.add_argument("--module", default=os.environ.get("DEMO_MODULE", str(harness.BUILD / "ngx_http_authentik_module.so")))
    ap.add_argument("--port", type=int, default=env_port("DEMO_PORT", 8080))
    ap.add_argument("--provider-port", type=int, default=env_port("DEMO_PROVIDER_PORT", 9000))
    ap.add_argument("--authentik", choices=("oidc", "emulator"), default=os.environ.get("DEMO_AUTHENTIK") or "oidc",
                    help="identity provider: the generic OIDC provider, or the authentik emulator (nginx as outpost)")
    ap.add_argument("--print-config", action="store_true", help="print the example nginx config and exit")
    a = ap.parse_args()
    emulator = a.authentik == "emulator"
    for port, env in ((a.port, "DEMO_PORT"), (a.provider_port, "DEMO_PROVIDER_PORT")):
        if not 0 < port < 65536:
            print(f"demo: port {port} is not a TCP port; pick another with {env}=<1-65535>", file=sys.stderr)
            return 1

    client = {
        "client_id": "nginx-demo",
        "client_secret": "demo-secret-" + os.urandom(16).hex(),
        "redirect_uris": [f"http://127.0.0.1:{a.port}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true",
                          f"http://localhost:{a.port}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"],
        "post_logout_redirect_uris": [f"http://127.0.0.1:{a.port}/", f"http://localhost:{a.port}/"],
        "token_endpoint_auth_method": "client_secret_basic",
        "id_token_signed_response_alg": "RS256",
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
    }
    issuer = f"http://127.0.0.1:{a.provider_port}"
    values = {"ISSUER": issuer, "CLIENT_ID": client["client_id"], "CLIENT_SECRET": client["client_secret"]}

    if a.print_config:
        workdir = Path(tempfile.mkdtemp(prefix="nginx-authentik-demo-"))
        n = Nginx("debian", workdir / "nginx")
        n.port = a.port
        n.vars["PORT"] = str(a.port)
        conf = OUTPOST_CONF if emulator else EXAMPLE_CONF
        print(n.subst(conf, UPSTREAM_PORT="<app port>", AUTHENTIK=issuer, TOKEN_FILE="<token file>", **values))
        return 0

    # Before anything starts: a port in use is one line, not a stack trace from a child.
    busy = busy_ports_message([(a.port, "nginx", "DEMO_PORT"),
                               (a.provider_port, "identity provider", "DEMO_PROVIDER_PORT")])
    if a.port == a.provider_port:
        busy = f"demo: nginx and the identity provider cannot share port {a.port}; set DEMO_PROVIDER_PORT"
    if busy:
        print(busy, file=sys.stderr)
        return 1

    procs = []
    stopping = False

    def stop():
        nonlocal stopping
        if stopping:
            return
        stopping = True
        for p in reversed(procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"stop: {exc}", file=sys.stderr)

    def on_signal(signum, _frame):
        if stopping:
            return  # already on the way out
        print(f"\ndemo: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
        raise SystemExit(0)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    die_with_parent(parent)
    workdir = Path(tempfile.mkdtemp(prefix="nginx-authentik-demo-"))
    try:
        if emulator:
            provider = Authentik(workdir / "authentik", port=a.provider_port, outpost_name="nginx demo outpost")
            procs.append(provider)
            provider.start()
            provider.add_provider("Demo provider", "demo", f"http://127.0.0.1:{a.port}", app_name="Demo app",
                                  skip_path_regex="^/public/\n^/health$")
            values["AUTHENTIK"] = provider.origin
            values["TOKEN_FILE"] = str(provider.write_token_file(workdir / "authentik.token"))
        else:
            provider = Provider(workdir / "provider", port=a.provider_port, clients=[client], issuer=issuer)
            procs.append(provider)
            provider.start()
        app = Upstream(workdir / "app", script=harness.T_DIR / "demo_app.py")
        procs.append(app)
        app.start()
        nginx = Nginx("debian", workdir / "nginx", worker_processes=2)
        nginx.binary, nginx.module = Path(a.nginx), Path(a.module)
        nginx.port = a.port
        nginx.vars["PORT"] = str(a.port)
        procs.append(nginx)
        nginx.start(OUTPOST_CONF if emulator else EXAMPLE_CONF, UPSTREAM_PORT=app.port, **values)
        if emulator:
            # the outpost's first fetch (worker 0's background task), before the URL is printed
            deadline = time.monotonic() + 15
            while harness.fresh_get(f"http://127.0.0.1:{a.port}/").status_code == 503:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not get its configuration from the authentik emulator")
                time.sleep(0.2)

        print()
        print(f"Open http://127.0.0.1:{a.port}/ and log in as alice / {harness.USERS['alice']}"
              f"  (or bob / {harness.USERS['bob']})")
        print(f"Sign out: http://127.0.0.1:{a.port}/outpost.goauthentik.io/sign_out"
              f"   no login needed: http://127.0.0.1:{a.port}/public/")
        if emulator:
            print(f"authentik (emulator): {issuer}/api/v3/outposts/proxy/ (nginx is its outpost)")
        else:
            print(f"Provider: {issuer}/.well-known/openid-configuration")
        print(f"nginx config: {nginx.conf_path}   error log: {nginx.error_log_path}")
        print("Ctrl-C to stop.")
        sys.stdout.flush()
        while True:
            for p in procs:
                if p.proc is not None and p.proc.poll() is not None:
                    print(f"{type(p).__name__} exited with {p.proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except Exception as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
