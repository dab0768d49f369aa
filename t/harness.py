"""Process and HTTP helpers for nginx-authentik's end-to-end tests.

Everything here starts real processes on free loopback ports (nginx, the node OIDC
provider, the upstream echo server) and stops them by process group.  The pytest
fixtures around these classes are in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import requests

T_DIR = Path(__file__).resolve().parent
REPO = T_DIR.parent
BUILD = REPO / "build"

# target name -> (nginx binary, module .so)
TARGETS = {
    "debian": (Path("/usr/sbin/nginx"), BUILD / "ngx_http_authentik_module.so"),
    "vendored": (BUILD / "vendored" / "sbin" / "nginx", BUILD / "vendored" / "ngx_http_authentik_module.so"),
}

CALLBACK_PATH = "/outpost.goauthentik.io/callback"
CALLBACK_QUERY = "X-authentik-auth-callback=true"
OUTPOST = "/outpost.goauthentik.io"

# hostnames under this domain resolve to 127.0.0.1 inside the test process
TEST_DOMAIN = "authentik.test"

USERS = {
    "alice": "alice-password",
    "bob": "bob-password",
    "carol": "carol-password",
    "dave": "dave-password",
}

IDENTITY_HEADERS = [
    "X-authentik-username",
    "X-authentik-groups",
    "X-authentik-entitlements",
    "X-authentik-email",
    "X-authentik-name",
    "X-authentik-uid",
    "X-authentik-jwt",
    "X-authentik-meta-outpost",
    "X-authentik-meta-provider",
    "X-authentik-meta-app",
    "X-authentik-meta-version",
]


def sub_for(username: str) -> str:
    """The provider's `sub` for a user (see provider/server.mjs subFor)."""
    return hashlib.sha256(f"nginx-authentik-test:{username}".encode()).hexdigest()


def session_cookie_name(client_id: str) -> str:
    return "authentik_proxy_" + hashlib.sha256(client_id.encode()).hexdigest()[:8]


def callback_url(origin: str) -> str:
    return f"{origin}{CALLBACK_PATH}?{CALLBACK_QUERY}"


# --- name resolution for *.authentik.test -------------------------------------------------
_orig_getaddrinfo = socket.getaddrinfo


def _test_getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        h = host.decode("ascii", "replace")
    else:
        h = host
    if isinstance(h, str) and (h == TEST_DOMAIN or h.endswith("." + TEST_DOMAIN)):
        host = "127.0.0.1"
    return _orig_getaddrinfo(host, *args, **kwargs)


def install_test_resolver():
    """Resolve `authentik.test` and every name under it to 127.0.0.1 in this process.

    requests (urllib3), websocket-client and aiohttp all resolve through
    socket.getaddrinfo, so URLs, Host headers and cookie domains stay exactly as a
    browser would see them with those names in /etc/hosts.
    """
    socket.getaddrinfo = _test_getaddrinfo


# --- ports and processes ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or 'process'} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what or 'process'} not listening on 127.0.0.1:{port} after {timeout}s")


def kill_group(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 5.0) -> None:
    """Stop a process started with start_new_session=True, and its whole group."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if proc.poll() is None or pgid is not None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    # whatever is left of the group (workers) goes too
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def wait_ready_line(path: Path, proc: subprocess.Popen, timeout: float, what: str, stderr_path: Path | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for line in path.read_text().splitlines():
                if line.startswith("ready "):
                    return line[len("ready "):].strip()
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    err = stderr_path.read_text()[-3000:] if stderr_path and stderr_path.exists() else ""
    raise RuntimeError(f"{what} did not become ready (exit={proc.poll()}):\n{err}")


def children_of(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 1 and int(rest[1]) == pid:
            kids.add(int(entry))
    return kids


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --- the OIDC provider (node) -----------------------------------------------------------
class Provider:
    """t/provider/server.mjs, a real oidc-provider."""

    def __init__(self, workdir: Path, port: int = 0, clients: list | None = None, ttl: int | None = None,
                 issuer: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.requested_port = port
        self.initial_clients = clients or []
        self.ttl = ttl
        self.requested_issuer = issuer
        self.proc = None
        self.issuer = None
        self.port = None

    def start(self, timeout: float = 30.0, attempts: int = 2) -> "Provider":
        """Starts the provider; a start that hangs (seen rarely on a loaded machine, before node
        reaches `listen`) is killed and retried once."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError:
                kill_group(self.proc)
                if attempt + 1 == attempts:
                    raise
        return self

    def _start(self, timeout: float) -> "Provider":
        node_modules = T_DIR / "provider" / "node_modules"
        if not (node_modules / "oidc-provider").is_dir():
            raise RuntimeError(f"{node_modules} is missing: run `npm ci` in {T_DIR / 'provider'}")
        clients_file = self.workdir / "clients.json"
        clients_file.write_text(json.dumps(self.initial_clients))
        cmd = ["node", str(T_DIR / "provider" / "server.mjs"), "--port", str(self.requested_port),
               "--clients", str(clients_file)]
        if self.ttl is not None:
            cmd += ["--ttl", str(self.ttl)]
        if self.requested_issuer:
            cmd += ["--issuer", self.requested_issuer]
        self.stdout_path = self.workdir / "provider.out"
        self.stderr_path = self.workdir / "provider.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=str(T_DIR / "provider"))
        self.issuer = wait_ready_line(self.stdout_path, self.proc, timeout, "provider", self.stderr_path)
        # where discovery lives: <issuer>/.well-known/openid-configuration (no double slash)
        self.issuer_base = self.issuer.rstrip("/")
        self.port = urllib.parse.urlsplit(self.issuer).port
        self.origin = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self):
        kill_group(self.proc)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    # control endpoints
    def _control(self, method, what, **kw):
        r = requests.request(method, f"{self.origin}/__control/{what}", timeout=10, **kw)
        r.raise_for_status()
        return r.json()

    def add_clients(self, *clients: dict):
        return self._control("POST", "clients", json=list(clients))

    def stall_token(self, ms: int, count: int | None = None):
        params = {"ms": ms}
        if count is not None:
            params["count"] = count
        return self._control("POST", "stall_token", params=params)

    def reset(self):
        return self._control("POST", "reset")

    def log(self) -> list:
        return self._control("GET", "log")

    def discovery(self) -> dict:
        r = requests.get(f"{self.issuer_base}/.well-known/openid-configuration", timeout=10)
        r.raise_for_status()
        return r.json()

    def new_client(self, origins, *, alg: str = "RS256", auth: str = "client_secret_basic",
                   token_ttl: int | None = None, client_id: str | None = None, register: bool = True,
                   post_logout_redirect_uris: list | None = None) -> dict:
        """Make (and by default register) a confidential client whose redirect URIs are
        the nginx callback on each of `origins` (e.g. http://127.0.0.1:PORT)."""
        if isinstance(origins, str):
            origins = [origins]
        client_id = client_id or "nginx-" + os.urandom(6).hex()
        client = {
            "client_id": client_id,
            "client_secret": os.urandom(32).hex(),
            "redirect_uris": [callback_url(o) for o in origins],
            "post_logout_redirect_uris": post_logout_redirect_uris or [o + "/" for o in origins],
            "token_endpoint_auth_method": auth,
            "id_token_signed_response_alg": alg,
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
        }
        if token_ttl is not None:
            client["token_ttl"] = token_ttl
        if register and self.alive():
            self.add_clients(client)
        return client


# --- the upstream echo server -------------------------------------------------------------
class Upstream:
    """t/upstream.py (the echo server), or another app with the same command line and
    `ready <port>` line (`script`, e.g. t/demo_app.py)."""

    def __init__(self, workdir: Path, port: int = 0, script: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.requested_port = port
        self.script = Path(script) if script else T_DIR / "upstream.py"
        self.proc = None

    def start(self, timeout: float = 15.0) -> "Upstream":
        self.stdout_path = self.workdir / "upstream.out"
        self.stderr_path = self.workdir / "upstream.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(self.script), "--port", str(self.requested_port)],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        self.port = int(wait_ready_line(self.stdout_path, self.proc, timeout, "upstream", self.stderr_path))
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self):
        kill_group(self.proc)
        self.proc = None


# --- nginx -----------------------------------------------------------------------------------
class Nginx:
    """One nginx master (+ workers) under a private prefix.

    Configs are snippets of http-level directives and server blocks, wrapped by
    `wrap()` into a whole nginx.conf.  `@NAME@` placeholders in snippets are replaced
    from `self.vars` (PORT, PREFIX, ...) and any keyword arguments.
    """

    def __init__(self, target: str, prefix: Path, worker_processes: int = 2):
        self.target = target
        self.binary, self.module = TARGETS[target]
        self.prefix = Path(prefix)
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "logs").mkdir(exist_ok=True)
        (self.prefix / "conf").mkdir(exist_ok=True)
        self.worker_processes = worker_processes
        self.port = free_port()
        self.conf_path = self.prefix / "conf" / "nginx.conf"
        self.error_log_path = self.prefix / "logs" / "error.log"
        self.access_log_path = self.prefix / "logs" / "access.log"
        self.pid_path = self.prefix / "logs" / "nginx.pid"
        self.proc = None
        self.vars = {"PORT": str(self.port), "PREFIX": str(self.prefix)}
        self._tests = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"http://{host or '127.0.0.1'}:{self.port}{path}"

    def subst(self, text: str, **extra) -> str:
        values = {**self.vars, **{k: str(v) for k, v in extra.items()}}

        def rep(m):
            name = m.group(1)
            if name not in values:
                raise KeyError(f"config placeholder @{name}@ has no value")
            return values[name]

        return re.sub(r"@([A-Z][A-Z0-9_]*)@", rep, text)

    def wrap(self, snippet: str, worker_processes: int | None = None, main: str = "", load_module: bool = True,
             **extra) -> str:
        """The whole nginx.conf for an http-level snippet."""
        p = self.prefix
        wp = worker_processes if worker_processes is not None else self.worker_processes
        lines = []
        if load_module:
            lines.append(f"load_module {self.module};")
        if os.geteuid() == 0:
            lines.append("user root;")
        lines += [
            f"worker_processes {wp};",
            "daemon off;",
            "master_process on;",
            f"pid {self.pid_path};",
            f"lock_file {p / 'logs' / 'nginx.lock'};",
            f"error_log {self.error_log_path} info;",
            "events { worker_connections 512; }",
        ]
        if main:
            lines.append(self.subst(main, **extra))
        lines += [
            "http {",
            "    log_format test '$pid $remote_addr \"$request\" $status $body_bytes_sent \"$http_host\"';",
            f"    access_log {self.access_log_path} test;",
            f"    client_body_temp_path {p / 'client_body_temp'};",
            f"    proxy_temp_path {p / 'proxy_temp'};",
            f"    fastcgi_temp_path {p / 'fastcgi_temp'};",
            f"    uwsgi_temp_path {p / 'uwsgi_temp'};",
            f"    scgi_temp_path {p / 'scgi_temp'};",
            "    default_type application/octet-stream;",
            "# --- test snippet ---",
            self.subst(snippet, **extra),
            "# --- end of test snippet ---",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def check_target(self):
        missing = [str(x) for x in (self.binary, self.module) if not x.exists()]
        if missing:
            raise FileNotFoundError(
                f"nginx target {self.target!r} is not built: missing {', '.join(missing)} "
                f"(build it with `make {'module' if self.target == 'debian' else 'module-vendored'}`, "
                f"or leave it out of NGINX_TARGETS)")

    def _cmd(self, conf: Path, *extra) -> list[str]:
        return [str(self.binary), "-p", str(self.prefix) + "/", "-c", str(conf), "-e", str(self.error_log_path), *extra]

    def test_config(self, conf_text: str, name: str | None = None) -> tuple[int, str]:
        """`nginx -t` on a whole config; returns (exit code, stderr+stdout).
        The config is written to <prefix>/conf/<name> (see `last_test_conf`)."""
        self._tests += 1
        conf = self.prefix / "conf" / (name or f"test{self._tests}.conf")
        conf.write_text(conf_text)
        self.last_test_conf = conf
        r = subprocess.run(self._cmd(conf, "-t"), capture_output=True, text=True, timeout=30)
        return r.returncode, r.stderr + r.stdout

    def start(self, snippet: str, worker_processes: int | None = None, main: str = "", timeout: float = 10.0,
              **extra) -> "Nginx":
        self.check_target()
        if worker_processes is not None:
            self.worker_processes = worker_processes
        text = self.wrap(snippet, main=main, **extra)
        self.conf_path.write_text(text)
        self.conf_text = text
        out = open(self.prefix / "logs" / "stderr.log", "ab")
        self.proc = subprocess.Popen(self._cmd(self.conf_path), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        try:
            wait_port(self.port, timeout, self.proc, "nginx")
            self.wait_workers(self.worker_processes, timeout=timeout)
        except Exception as e:
            log = self.error_log()[-4000:]
            stderr = (self.prefix / "logs" / "stderr.log").read_text()[-2000:]
            self.stop()
            raise RuntimeError(f"nginx failed to start: {e}\n--- error.log ---\n{log}\n--- stderr ---\n{stderr}") from e
        return self

    def workers(self) -> set[int]:
        if self.proc is None:
            return set()
        return {pid for pid in children_of(self.proc.pid) if "worker process" in process_title(pid)}

    def wait_workers(self, count: int, exclude: set[int] = frozenset(), timeout: float = 10.0) -> set[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}")
            w = self.workers() - set(exclude)
            if len(w) >= count:
                return w
            time.sleep(0.05)
        raise TimeoutError(f"nginx: {count} worker processes did not appear")

    def reload(self, snippet: str | None = None, timeout: float = 10.0, **extra) -> set[int]:
        """HUP the master (optionally with a new snippet); wait for the new workers."""
        if snippet is not None:
            text = self.wrap(snippet, **extra)
            self.conf_path.write_text(text)
            self.conf_text = text
        old = self.workers()
        log_len = len(self.error_log())
        os.kill(self.proc.pid, signal.SIGHUP)
        try:
            return self.wait_workers(self.worker_processes, exclude=old, timeout=timeout)
        except TimeoutError as e:
            raise RuntimeError(f"nginx reload failed: {e}\n{self.error_log()[log_len:][-4000:]}") from e

    def error_log(self) -> str:
        try:
            return self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> str:
        try:
            return self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        kill_group(self.proc, signal.SIGTERM)
        self.proc = None


def provider_block(name: str, issuer: str, client: dict, external_host: str | None = None, mode: str = "proxy",
                   extra: str = "", secret_file: str | None = None) -> str:
    """An `authentik_provider` block for a client made by Provider.new_client."""
    lines = [f"authentik_provider {name} {{",
             f"    issuer {issuer};",
             f"    client_id {client['client_id']};"]
    if secret_file:
        lines.append(f"    client_secret_file {secret_file};")
    else:
        lines.append(f"    client_secret {client['client_secret']};")
    if external_host:
        lines.append(f"    external_host {external_host};")
    lines.append(f"    mode {mode};")
    for line in extra.strip().splitlines():
        lines.append("    " + line.strip())
    lines.append("}")
    return "\n".join(lines)


# --- echo responses -------------------------------------------------------------------------
class Echo:
    """What the upstream echo server received."""

    def __init__(self, data: dict):
        self.data = data
        self.method = data["method"]
        self.path = data["path"]
        self.query = data["query"]
        self.raw_path = data["raw_path"]
        self.headers = [tuple(h) for h in data["headers"]]

    @staticmethod
    def _norm(name: str) -> str:
        return name.lower()

    def getall(self, name: str) -> list[str]:
        n = self._norm(name)
        return [v for k, v in self.headers if k.lower() == n]

    def get(self, name: str, default=None):
        vals = self.getall(name)
        if not vals:
            return default
        assert len(vals) == 1, f"header {name} received {len(vals)} times: {vals}"
        return vals[0]

    def like(self, name: str) -> list[tuple[str, str]]:
        """Headers whose name equals `name` ignoring case and `_`/`-`."""
        n = name.lower().replace("_", "-")
        return [(k, v) for k, v in self.headers if k.lower().replace("_", "-") == n]

    def cookies(self) -> dict:
        out = {}
        for v in self.getall("Cookie"):
            for part in v.split(";"):
                if "=" in part:
                    k, _, val = part.strip().partition("=")
                    out[k] = val
        return out

    def __repr__(self):
        return f"Echo({self.method} {self.raw_path} {self.headers})"


def echo(resp: requests.Response) -> Echo:
    assert resp.status_code == 200, f"expected 200 from upstream, got {resp.status_code}: {resp.text[:500]}"
    try:
        data = resp.json()
    except ValueError:
        raise AssertionError(f"not an upstream echo response: {resp.text[:500]}")
    assert "headers" in data and "method" in data, f"not an upstream echo response: {data}"
    return Echo(data)


# --- Set-Cookie parsing ---------------------------------------------------------------------
@dataclass
class SetCookie:
    name: str
    value: str
    attrs: dict  # lower-case attribute name -> value ('' for flags)
    raw: str

    def attr(self, name: str, default=None):
        return self.attrs.get(name.lower(), default)

    def has(self, name: str) -> bool:
        return name.lower() in self.attrs


def parse_set_cookie(raw: str) -> SetCookie:
    parts = [p.strip() for p in raw.split(";")]
    name, _, value = parts[0].partition("=")
    attrs = {}
    for p in parts[1:]:
        if not p:
            continue
        k, _, v = p.partition("=")
        attrs[k.strip().lower()] = v.strip()
    return SetCookie(name.strip(), value.strip(), attrs, raw)


def set_cookies(resp: requests.Response) -> list[SetCookie]:
    return [parse_set_cookie(v) for v in resp.raw.headers.getlist("Set-Cookie")]


# --- HTML forms ---------------------------------------------------------------------------------
class _FormParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms = []
        self._cur = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._cur = {"id": a.get("id"), "action": a.get("action", ""), "method": (a.get("method") or "get").lower(),
                         "inputs": {}}
            self.forms.append(self._cur)
        elif tag == "input" and self._cur is not None and a.get("name"):
            self._cur["inputs"][a["name"]] = a.get("value", "")

    def handle_endtag(self, tag):
        if tag == "form":
            self._cur = None


def parse_forms(html: str) -> list[dict]:
    p = _FormParser()
    p.feed(html)
    return p.forms


def links(html: str) -> list[str]:
    return re.findall(r"""href\s*=\s*["']([^"']*)["']""", html)


# --- the browser ---------------------------------------------------------------------------------
NAV_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) nginx-authentik-tests",
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
}

XHR_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) nginx-authentik-tests",
    "Accept": "application/json",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Dest": "empty",
    "X-Requested-With": "XMLHttpRequest",
}


@dataclass
class Hop:
    method: str
    url: str
    status: int
    location: str | None
    set_cookie: list = field(default_factory=list)

    def __repr__(self):
        loc = f" -> {self.location}" if self.location else ""
        return f"{self.method} {self.url} {self.status}{loc}"


class LoginError(AssertionError):
    pass


class Browser:
    """A cookie-keeping client that follows redirects hop by hop like a browser."""

    def __init__(self, max_hops: int = 20, timeout: float = 15.0):
        self.s = requests.Session()
        self.s.trust_env = False  # never a proxy
        self.s.headers.clear()
        self.s.headers.update(NAV_HEADERS)
        self.s.headers["Accept-Encoding"] = "identity"
        self.max_hops = max_hops
        self.timeout = timeout
        self.hops: list[Hop] = []

    @property
    def cookies(self):
        return self.s.cookies

    def cookie(self, name: str, domain: str | None = None):
        for c in self.s.cookies:
            if c.name == name and (domain is None or c.domain.lstrip(".") == domain.lstrip(".")):
                return c.value
        return None

    def request(self, method: str, url: str, follow: bool = True, headers: dict | None = None, data=None,
                max_hops: int | None = None, timeout: float | None = None, stop=None, **kw) -> requests.Response:
        """Send a request; follow redirects (if `follow`) up to max_hops, recording each
        hop in self.hops (reset per call).  `stop(resp)` -> True ends the walk early."""
        self.hops = []
        limit = self.max_hops if max_hops is None else max_hops
        params = kw.pop("params", None)
        if params:
            url = url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        for _ in range(limit + 1):
            r = self.s.request(method, url, headers=headers, data=data, allow_redirects=False,
                               timeout=timeout or self.timeout, **kw)
            loc = r.headers.get("Location")
            self.hops.append(Hop(method, url, r.status_code, loc, r.raw.headers.getlist("Set-Cookie")))
            if not follow or r.status_code not in (301, 302, 303, 307, 308) or not loc:
                return r
            if stop is not None and stop(r):
                return r
            nxt = urllib.parse.urljoin(url, loc)
            if not is_local_url(nxt):
                # never leave the machine: a redirect elsewhere is returned as is
                return r
            url = nxt
            if r.status_code in (301, 302, 303) and method not in ("GET", "HEAD"):
                method, data = "GET", None
            # headers given for the first request (e.g. XHR) are kept, like fetch() would
        raise AssertionError(f"more than {limit} redirects: {self.hops}")

    def get(self, url, **kw):
        return self.request("GET", url, **kw)

    def post(self, url, data=None, **kw):
        return self.request("POST", url, data=data, **kw)

    def hop_urls(self) -> list[str]:
        return [h.url for h in self.hops]

    # -- login --
    def start_login(self, url: str, **kw) -> requests.Response:
        """Navigate to a protected URL and follow redirects to the provider's login form
        (or wherever it ends when the provider already has a session)."""
        return self.get(url, **kw)

    def submit_login(self, form_page: requests.Response, user: str = "alice", password: str | None = None,
                     **kw) -> requests.Response:
        forms = [f for f in parse_forms(form_page.text) if f["id"] == "login"]
        if not forms:
            raise LoginError(f"no login form at {form_page.url} ({form_page.status_code}): {form_page.text[:500]}\n"
                             f"hops: {self.hops}")
        form = forms[0]
        action = urllib.parse.urljoin(form_page.url, form["action"])
        fields = dict(form["inputs"])
        fields["username"] = user
        fields["password"] = USERS[user] if password is None else password
        return self.post(action, data=fields, **kw)

    def login(self, url: str, user: str = "alice", password: str | None = None, **kw) -> requests.Response:
        """Full browser login through nginx and the provider; returns the final response
        (normally the upstream's echo of the original URL)."""
        r = self.start_login(url, **kw)
        if is_login_form(r):
            first = self.hops
            r = self.submit_login(r, user, password, **kw)
            self.hops = first + self.hops  # every hop of the login
        return r

    def submit_form(self, page: requests.Response, form_id: str | None = None, extra: dict | None = None,
                    **kw) -> requests.Response:
        forms = parse_forms(page.text)
        if form_id is not None:
            forms = [f for f in forms if f["id"] == form_id]
        if not forms:
            raise AssertionError(f"no form on {page.url}: {page.text[:500]}")
        f = forms[0]
        action = urllib.parse.urljoin(page.url, f["action"] or page.url)
        fields = {**f["inputs"], **(extra or {})}
        if f["method"] == "post":
            return self.post(action, data=fields, **kw)
        return self.get(action, params=fields, **kw)

    def close(self):
        self.s.close()


def is_local_url(url: str) -> bool:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https", "ws", "wss"):
        return False
    h = (u.hostname or "").lower()
    return h in ("127.0.0.1", "localhost") or h == TEST_DOMAIN or h.endswith("." + TEST_DOMAIN)


def is_login_form(r: requests.Response) -> bool:
    return r.status_code == 200 and "/interaction/" in r.url and 'id="login"' in r.text


def query_of(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


def same_url_path(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return u.path + ("?" + u.query if u.query else "")


def fresh_get(url: str, cookies: dict | None = None, headers: dict | None = None, timeout: float = 15.0,
              **kw) -> requests.Response:
    """One GET on a new connection (so that successive calls can reach different nginx
    workers), no redirects followed."""
    h = {**NAV_HEADERS, "Connection": "close", **(headers or {})}
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, cookies=cookies, headers=h, allow_redirects=False, timeout=timeout, **kw)


def access_pids(nginx: Nginx) -> set[int]:
    """Worker pids that logged a request in the access log (log_format `test`)."""
    pids = set()
    for line in nginx.access_log().splitlines():
        head = line.split(" ", 1)[0]
        if head.isdigit():
            pids.add(int(head))
    return pids


# --- a typical deployment: one provider, one server ------------------------------------------
WS_LOCATION = """
    location /ws {
        auth_authentik @NAME@;
        proxy_pass @UPSTREAM@;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_read_timeout 30s;
    }
"""


class App:
    """nginx + provider + upstream wired together with a standard config.

    app.start(mode=...) writes:
        authentik_session_zone zone=authentik:<zone_size>;
        authentik_provider main { issuer; client_id; client_secret; external_host; mode; <provider_extra> }
        server {
            listen 127.0.0.1:PORT;
            <server_extra>
            location / { auth_authentik main; proxy_pass UPSTREAM; <location_extra> }
            location /ws { auth_authentik main; ... websocket proxying ... }
            location /open { auth_authentik off; proxy_pass UPSTREAM; }
        }
    """

    def __init__(self, nginx: Nginx, provider: Provider, upstream: Upstream):
        self.nginx = nginx
        self.provider = provider
        self.upstream = upstream
        self.client = None
        self.name = "main"

    @property
    def origin(self):
        return self.nginx.origin

    def url(self, path="/", host=None):
        return self.nginx.url(path, host)

    @property
    def cookie_name(self):
        return session_cookie_name(self.client["client_id"])

    def new_client(self, origins=None, **kw) -> dict:
        return self.provider.new_client(origins or [self.nginx.origin], **kw)

    def config(self, mode="proxy", client=None, external_host="default", provider_extra="", server_extra="",
               location_extra="", http_extra="", zone_size="1m", server_name="", listen_extra="", name="main") -> str:
        self.client = client or self.client or self.new_client()
        self.name = name
        if external_host == "default":
            external_host = self.nginx.origin
        block = provider_block(name, self.provider.issuer, self.client, external_host, mode, provider_extra)
        return f"""
authentik_session_zone zone=authentik:{zone_size};
{http_extra}
{block}
server {{
    listen 127.0.0.1:@PORT@{(' ' + listen_extra) if listen_extra else ''};
    {('server_name ' + server_name + ';') if server_name else ''}
    {server_extra}
    location / {{
        auth_authentik {name};
        proxy_pass {self.upstream.url};
        {location_extra}
    }}
{WS_LOCATION.replace('@NAME@', name).replace('@UPSTREAM@', self.upstream.url)}
    location /open {{
        auth_authentik off;
        proxy_pass {self.upstream.url};
    }}
}}
"""

    def start(self, worker_processes=None, **kw) -> "App":
        self.nginx.start(self.config(**kw), worker_processes=worker_processes)
        return self

    def login(self, browser: Browser, path="/", user="alice", host=None) -> requests.Response:
        r = browser.login(self.url(path, host), user)
        return r


# --- the authentik emulator (authentik_emulator.py) ------------------------------------------
class Authentik:
    """t/authentik_emulator.py: authentik's outpost API, websocket and OAuth2 endpoints.

    Its data lives in a state file under `workdir`, so restart() (same port) keeps the
    providers, the outpost pk, the sessions and the token; stop() alone is "authentik down".
    Helpers wrap the emulator's /__control/ endpoints (see its docstring).
    """

    DEFAULT_TOKEN = "nginx-authentik-test-token"

    def __init__(self, workdir: Path, port: int = 0, token: str = DEFAULT_TOKEN, outpost_name: str = "nginx outpost",
                 state_file: Path | None = None, tls: tuple[Path, Path] | None = None):
        # tls: (certificate, key) PEM files: the emulator serves https/wss, and the control
        # calls trust that certificate
        self.tls = tls
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or None
        self.requested_port = port
        self.initial_token = token
        self.token = token
        self.outpost_name = outpost_name
        self.state_file = Path(state_file) if state_file else self.workdir / "authentik-state.json"
        self.proc = None
        self.base_url = None

    def start(self, timeout: float = 15.0) -> "Authentik":
        port = self.port or self.requested_port
        cmd = [sys.executable, str(T_DIR / "authentik_emulator.py"), "--port", str(port), "--token",
               self.initial_token, "--outpost-name", self.outpost_name, "--state", str(self.state_file)]
        if self.tls:
            cmd += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        self.stdout_path = self.workdir / "authentik.out"
        self.stderr_path = self.workdir / "authentik.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        self.base_url = wait_ready_line(self.stdout_path, self.proc, timeout, "authentik emulator", self.stderr_path)
        self.port = urllib.parse.urlsplit(self.base_url).port
        return self

    def stop(self):
        kill_group(self.proc)
        self.proc = None

    def restart(self, timeout: float = 15.0) -> "Authentik":
        """Stop and start again on the same port with the same data."""
        self.stop()
        return self.start(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"http://{host or '127.0.0.1'}:{self.port}{path}"

    def write_token_file(self, path: Path, token: str | None = None) -> Path:
        path = Path(path)
        path.write_text((token if token is not None else self.token) + "\n")
        return path

    # -- the API as an outpost sees it --
    def api(self, path: str, token: str | None = None, headers: dict | None = None, **kw) -> requests.Response:
        h = {"Authorization": f"Bearer {self.token if token is None else token}",
             "User-Agent": "goauthentik.io/outpost/test", **(headers or {})}
        return requests.get(f"{self.origin}/api/v3/{path.lstrip('/')}", headers=h, timeout=10, **kw)

    def outpost(self) -> dict:
        return self._control("GET", "outpost")

    def served_providers(self) -> list[dict]:
        """Every ProxyOutpostConfig, fetched page by page as an outpost does."""
        out, page = [], 1
        while page:
            r = self.api("outposts/proxy/", params={"page": page, "page_size": 100})
            r.raise_for_status()
            data = r.json()
            out += data["results"]
            page = data["pagination"]["next"]
        return out

    # -- control endpoints --
    def _control(self, method: str, what: str, **kw):
        if self.tls:
            kw.setdefault("verify", str(self.tls[0]))
        r = requests.request(method, f"{self.origin}/__control/{what}", timeout=10, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"emulator {method} /__control/{what}: {r.status_code} {r.text[:500]}")
        return r.json()

    @staticmethod
    def _notify(notify: bool) -> dict:
        return {"notify": "1"} if notify else {}

    def add_provider(self, name: str, slug: str | None = None, external_host: str = "", mode: str = "proxy",
                     cookie_domain: str = "", skip_path_regex: str = "", global_issuer: bool = False,
                     scopes: list | None = None, notify: bool = False, **fields) -> dict:
        """Create a proxy provider (and its application, slug defaults to name); returns the
        ProxyOutpostConfig as the API serves it (URLs on 127.0.0.1:PORT)."""
        body = {"name": name, "slug": slug or name, "external_host": external_host, "mode": mode,
                "cookie_domain": cookie_domain, "skip_path_regex": skip_path_regex, "global_issuer": global_issuer,
                **fields}
        if scopes is not None:
            body["scopes"] = scopes
        return self._control("POST", "providers", json=body, params=self._notify(notify))

    def add_providers(self, providers: list[dict], notify: bool = False) -> list[dict]:
        """Create many at once: each dict has the fields of add_provider (slug defaults to name)."""
        body = [{"slug": p["name"], **p} for p in providers]
        return self._control("POST", "providers", json=body, params=self._notify(notify))

    def update_provider(self, name: str, /, notify: bool = False, **fields) -> dict:
        """Change fields of provider `name` (a `name=` field renames it)."""
        return self._control("PATCH", f"providers/{urllib.parse.quote(name, safe='')}", json=fields,
                             params=self._notify(notify))

    def remove_provider(self, name: str, notify: bool = False) -> dict:
        return self._control("DELETE", f"providers/{urllib.parse.quote(name, safe='')}", params=self._notify(notify))

    def providers(self) -> list[dict]:
        return self._control("GET", "providers")

    def set_outpost(self, name: str | None = None, config: dict | None = None, notify: bool = False) -> dict:
        body = {}
        if name is not None:
            body["name"] = name
        if config is not None:
            body["config"] = config
        return self._control("POST", "outpost", json=body, params=self._notify(notify))

    def trigger_update(self) -> int:
        return self._control("POST", "trigger_update")["notified"]

    def session_end(self, username: str | None = None, session_id: str | None = None) -> dict:
        body = {"username": username} if username is not None else {"session_id": session_id}
        return self._control("POST", "session_end", json=body)

    def drop_websockets(self, abort: bool = False) -> int:
        return self._control("POST", "drop_websockets", json={"abort": abort})["dropped"]

    def api_calls(self, reset: bool = False) -> dict:
        return self._control("GET", "api_calls", params={"reset": "1"} if reset else {})

    def reset_api_calls(self):
        return self._control("POST", "api_calls/reset")

    def websockets(self) -> dict:
        return self._control("GET", "websockets")

    def set_token(self, token: str):
        self.token = token
        return self._control("POST", "token", json={"token": token})

    def sessions(self) -> list[dict]:
        return self._control("GET", "sessions")

    def app_password(self, username: str, password: str):
        return self._control("POST", "app_password", json={"username": username, "password": password})

    def faults(self, **kw):
        return self._control("POST", "faults", json=kw)

    def oauth_calls(self, reset: bool = False) -> list[dict]:
        """Every call to /application/o/... since the last reset (path, pid)."""
        return self._control("GET", "oauth_calls", params={"reset": "1"} if reset else {})["calls"]

    def user_attributes(self, username: str, **attributes) -> dict:
        return self._control("POST", "user_attributes", json={"username": username, "attributes": attributes})

    def tokens(self) -> list[dict]:
        return self._control("GET", "tokens")

    def events(self) -> list[dict]:
        return self._control("GET", "events")

    def tokens(self) -> list[dict]:
        return self._control("GET", "tokens")

    def reset(self):
        self.token = self.initial_token
        return self._control("POST", "reset")

    def wait_websocket(self, pred, timeout: float = 10.0, what: str = "websocket condition") -> dict:
        """Poll websockets() until pred(view) is true; returns that view."""
        deadline = time.monotonic() + timeout
        view = None
        while time.monotonic() < deadline:
            view = self.websockets()
            if pred(view):
                return view
            time.sleep(0.1)
        raise AssertionError(f"{what}: not seen within {timeout}s; last view: "
                             f"{json.dumps(view and view.get('connections'), default=str)[:3000]}")


# --- the shared session store (store=redis://...) --------------------------------------------
class Redis:
    """A real redis-server (Debian's package; Valkey speaks the same protocol) on a free
    loopback port with its own config and directory, never the system service. No
    persistence (a restart starts empty, the worst case for the nodes); keyspace
    notifications for expired and evicted keys on (`Exe`), as the README asks of operators."""

    BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"
    CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

    def __init__(self, workdir: Path, port: int = 0, password: str | None = None, tls: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.proc = None
        if tls:
            self._make_certificates()

    def _make_certificates(self):
        """A test CA (`ca.pem`) and a certificate for 127.0.0.1 signed by it."""
        d = self.workdir
        self.ca_file = d / "ca.pem"

        def run(*args):
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=nginx-authentik test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
        (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")

    def start(self, timeout: float = 10.0) -> "Redis":
        conf = self.workdir / "redis.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.workdir}", 'save ""', "appendonly no",
                 "notify-keyspace-events Exe", f"logfile {self.workdir / 'redis.log'}", "daemonize no"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.tls:
            lines[0] = f"port 0\ntls-port {self.port}"
            lines += [f"tls-cert-file {self.workdir / 'server.pem'}", f"tls-key-file {self.workdir / 'server.key'}",
                      f"tls-ca-cert-file {self.ca_file}", "tls-auth-clients no"]
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([self.BINARY, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, timeout, self.proc, "redis-server")
        return self

    def stop(self):
        kill_group(self.proc, signal.SIGKILL)
        self.proc = None

    def restart(self) -> "Redis":
        self.stop()
        return self.start()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        cmd = [self.CLI, "-p", str(self.port), "--no-auth-warning"]
        if self.tls:
            cmd += ["--tls", "--cacert", str(self.ca_file)]
        if self.password:
            cmd += ["-a", self.password]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10, check=True).stdout

    def calls(self, command: str) -> int:
        """How often `command` ran since the last CONFIG RESETSTAT."""
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith(f"cmdstat_{command.lower()}:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0

    def keys(self, pattern: str = "*") -> list[str]:
        return [k for k in self.cli("--scan", "--pattern", pattern).splitlines() if k]
