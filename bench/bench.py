#!/usr/bin/env python3
"""`make bench`: nginx-authentik side by side with the designs users run today, and at scale.

Set-ups (all on 127.0.0.1, one run, the same upstream):
  1 baseline    nginx proxy_pass to the upstream, no authentication
  2 authentik   the same with `auth_authentik` and a session from a real login (this module)
  3 auth_request nginx auth_request to a zero-work auth responder answering 200 + the six
                identity headers, auth_request_set / proxy_set_header as in authentik's docs
  4 apache      Apache httpd (mpm_event) + mod_auth_openidc, shm cache, a real session
The upstream is a separate nginx answering `return 200 "ok"` (1 worker); the auth responder of
set-up 3 is another separate nginx (1 worker).

Usage: bench.py [--smoke] [--out FILE.md]   (BENCH_SMOKE=1 is the same as --smoke)
See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "t"))
sys.path.insert(0, str(BENCH))

import requests  # noqa: E402

import harness  # noqa: E402
from harness import Browser, Provider, callback_url, session_cookie_name  # noqa: E402
from procs import (ApacheProc, NginxProc, cpu_of, machine_busy, set_affinity, wrk,  # noqa: E402
                   wrk_script)

MODULE = REPO / "build" / "ngx_http_authentik_module.so"
BENCH_MODULE = REPO / "build" / "bench" / "ngx_http_authentik_module.so"

NOISE_CORES = 0.3  # a run during which other processes used more CPU than this is repeated (budget)
FRONT_CPU = {1}  # per-core runs: the front server alone on CPU 1 ...
OTHER_CPU = {0}  # ... wrk, the upstream and the auth responder on CPU 0
SETUPS = ["baseline", "authentik", "authentik_bearer", "authentik_metrics", "auth_request", "apache", "store"]
LABEL = {
    "baseline": "1 nginx proxy_pass, no auth",
    "authentik": "2 nginx + auth_authentik (this module)",
    "authentik_bearer": "2b set-up 2, header auth: cached `Authorization: Bearer`, no cookie",
    "authentik_metrics": "2m set-up 2 with `authentik_metrics` (counting on)",
    "auth_request": "3 nginx auth_request -> zero-work responder",
    "apache": "4 Apache httpd + mod_auth_openidc (shm)",
    "store": "5 nginx + auth_authentik + store= redis (L1 hit)",
}
SHORT = {"baseline": "1", "authentik": "2", "authentik_bearer": "2b", "authentik_metrics": "2m", "auth_request": "3",
         "apache": "4", "store": "5"}

IDENTITY = {  # what the zero-work auth responder of set-up 3 answers (alice's values)
    "X-authentik-username": "alice",
    "X-authentik-groups": "admins|users",
    "X-authentik-entitlements": "app-read|app-write",
    "X-authentik-email": "alice@example.test",
    "X-authentik-name": "Alice Liddell",
    "X-authentik-uid": harness.sub_for("alice"),
}

PROXY = 'proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";'


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Params:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.conns = 32
        self.threads = 1
        self.duration = 1 if smoke else 8
        self.warmup = 1 if smoke else 2
        self.reps = 1 if smoke else 3
        self.paced_duration = 2 if smoke else 15
        self.paced_delay_ms = 4
        self.callgrind_n = 100 if smoke else 2000
        self.scale_sizes = [1000] if smoke else [1000, 100_000, 1_000_000]
        self.fill_batch = 50_000
        self.scale_duration = 1 if smoke else 8
        self.login_seconds = 3 if smoke else 20
        self.login_clients = 2 if smoke else 4
        self.apache = (not smoke) or os.environ.get("BENCH_SMOKE_APACHE") == "1"


# --- configuration snippets ----------------------------------------------------------------------
def upstream_http() -> str:
    # /echo shows what the upstream received (used once per set-up to verify identity headers)
    return """
server {
    listen 127.0.0.1:@PORT@;
    underscores_in_headers on;
    location / { return 200 "ok"; }
    location = /echo {
        return 200 "username=$http_x_authentik_username\\ngroups=$http_x_authentik_groups\\njwt=$http_x_authentik_jwt\\nuid=$http_x_authentik_uid\\nauthorization=$http_authorization\\noidc_username=$http_oidc_claim_preferred_username\\ncookie=$http_cookie\\n";
    }
}
"""


def responder_http() -> str:
    adds = "\n".join(f'        add_header {k} "{v}";' for k, v in IDENTITY.items())
    return f"""
server {{
    listen 127.0.0.1:@PORT@;
    location / {{
{adds}
        return 200;
    }}
}}
"""


def app_upstream(up_port: int) -> str:
    return f"upstream app {{ server 127.0.0.1:{up_port}; keepalive 32; }}\n"


def baseline_http(up_port: int) -> str:
    return app_upstream(up_port) + f"""
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ {PROXY} }}
}}
"""


def authentik_http(up_port: int, provider: Provider, client: dict, origin: str, zone: str = "64m",
                   metrics: bool = False, store: str = "") -> str:
    """Set-up 2; with `metrics`, the same plus an `authentik_metrics` location (counting on);
    with `store`, the zone backed by that session store (set-up 5)."""
    block = harness.provider_block("main", provider.issuer, client, origin, "proxy")
    scrape = "location = /metrics { authentik_metrics; allow 127.0.0.1; deny all; }" if metrics else ""
    return app_upstream(up_port) + f"""
authentik_session_zone zone=authentik:{zone}{(' store=' + store) if store else ''};
{block}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{
        auth_authentik main;
        {PROXY}
    }}
    {scrape}
}}
"""


def auth_request_http(up_port: int, responder_port: int) -> str:
    # authentik's documented nginx (standalone) configuration, with the outpost replaced by the
    # zero-work responder; keepalive to it as the docs' `upstream authentik { keepalive 10; }`.
    sets = "\n".join(
        f"        auth_request_set $authentik_{k[12:].lower()} $upstream_http_{k.lower().replace('-', '_')};"
        for k in IDENTITY)
    hdrs = "\n".join(f"        proxy_set_header {k} $authentik_{k[12:].lower()};" for k in IDENTITY)
    return app_upstream(up_port) + f"""
upstream authentik {{ server 127.0.0.1:{responder_port}; keepalive 10; }}
server {{
    listen 127.0.0.1:@PORT@;
    proxy_buffers 8 16k;
    proxy_buffer_size 32k;
    location / {{
        {PROXY}
        auth_request /outpost.goauthentik.io/auth/nginx;
        error_page 401 = @goauthentik_proxy_signin;
        auth_request_set $auth_cookie $upstream_http_set_cookie;
        add_header Set-Cookie $auth_cookie;
{sets}
{hdrs}
    }}
    location /outpost.goauthentik.io {{
        proxy_pass http://authentik/outpost.goauthentik.io;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
        add_header Set-Cookie $auth_cookie;
        auth_request_set $auth_cookie $upstream_http_set_cookie;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
    }}
    location @goauthentik_proxy_signin {{
        internal;
        add_header Set-Cookie $auth_cookie;
        return 302 /outpost.goauthentik.io/start?rd=$request_uri;
    }}
}}
"""


# --- helpers -----------------------------------------------------------------------------------------
def machine_facts() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx_v = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr.strip()
    apache_v = ""
    if shutil.which("apache2"):
        out = subprocess.run(["apache2", "-v"], capture_output=True, text=True,
                             env={**os.environ, "APACHE_LOG_DIR": "/tmp"}).stdout
        m = re.search(r"Server version: (\S+)", out)
        apache_v = m.group(1) if m else out.strip()[:60]
    oidc_v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libapache2-mod-auth-openidc"],
                            capture_output=True, text=True).stdout.strip()
    wrk_v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wrk"], capture_output=True, text=True).stdout
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) // 1024
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src", "core"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_mib": mem,
        "kernel": platform.release(),
        "nginx": nginx_v,
        "apache": apache_v,
        "mod_auth_openidc": oidc_v,
        "wrk": wrk_v.strip(),
        "git": git + (" (src/core modified)" if dirty else ""),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def check_upstream_sees(url: str, cookies: dict, want: dict, headers: dict | None = None) -> dict:
    """GET <front>/echo; the upstream answers with the headers it got. Checks `want` (field ->
    expected value, or True for non-empty) and returns the fields."""
    r = requests.get(url, cookies=cookies, headers=headers or {}, timeout=15, allow_redirects=False)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: expected 200 from the upstream, got {r.status_code}: {r.text[:300]}")
    fields = dict(line.split("=", 1) for line in r.text.splitlines() if "=" in line)
    for k, v in want.items():
        got = fields.get(k, "")
        if (v is True and not got) or (v is not True and got != v):
            raise RuntimeError(f"{url}: upstream got {k}={got!r}, expected {v!r}")
    return fields


def plain_ok(url: str, cookies: dict | None = None, headers: dict | None = None) -> None:
    r = requests.get(url, cookies=cookies or {}, headers=headers or {}, timeout=15, allow_redirects=False)
    if r.status_code != 200 or r.text != "ok":
        raise RuntimeError(f"{url}: expected 200 'ok', got {r.status_code}: {r.text[:300]}")


def login_cookie(url: str, cookie_name: str, user: str = "alice", timeout: float = 15.0) -> str:
    """A real login through the front server and the provider; returns the session cookie value."""
    b = Browser(timeout=timeout)
    try:
        r = b.login(url, user)
        if r.status_code != 200 or r.text != "ok":
            raise RuntimeError(f"login via {url} ended with {r.status_code} {r.text[:200]!r}; hops: {b.hops}")
        v = b.cookie(cookie_name)
        if not v:
            raise RuntimeError(f"login via {url}: no {cookie_name} cookie; cookies: {[c.name for c in b.cookies]}")
        return v
    finally:
        b.close()


def us(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 10000:
        return f"{x / 1000:.1f} ms"
    return f"{x:.0f} µs"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- the bench -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, p: Params, workdir: Path):
        self.p = p
        self.wd = workdir
        self.res: dict = {"params": vars(p).copy(), "runs": [], "notes": [], "failed": []}
        self.procs: list = []
        self.script = wrk_script(workdir)
        self.retry_budget = 0 if p.smoke else 24

    # processes
    def track(self, proc):
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:
                pass

    def start_common(self):
        log("starting the OIDC provider, the upstream and the auth responder")
        self.provider = self.track(Provider(self.wd / "provider"))
        self.provider.start()
        self.upstream = self.track(NginxProc("upstream", self.wd)).start(upstream_http())
        self.responder = self.track(NginxProc("responder", self.wd)).start(responder_http())
        plain_ok(self.upstream.origin + "/")
        # fronts (ports are fixed at construction so the client's redirect URIs can name them)
        self.front = {
            "baseline": self.track(NginxProc("front-baseline", self.wd)),
            "authentik": self.track(NginxProc("front-authentik", self.wd, MODULE)),
            "authentik_metrics": self.track(NginxProc("front-authentik-metrics", self.wd, MODULE)),
            "auth_request": self.track(NginxProc("front-auth-request", self.wd)),
            "store": self.track(NginxProc("front-store", self.wd, MODULE)),
        }
        # set-up 5's shared session store: a private redis-server on loopback
        self.redis = self.track(harness.Redis(self.wd / "redis"))
        self.redis.start()
        self.cg_front = self.track(NginxProc("callgrind-authentik", self.wd, MODULE))
        self.cg_base = self.track(NginxProc("callgrind-baseline", self.wd))
        self.scale_front = self.track(NginxProc("scale-authentik", self.wd, BENCH_MODULE))
        origins = [self.front["authentik"].origin, self.front["authentik_metrics"].origin, self.cg_front.origin,
                   self.scale_front.origin, self.front["store"].origin]
        self.client = self.provider.new_client(origins, client_id="nginx-bench")
        self.cookie_name = session_cookie_name(self.client["client_id"])
        self.apache = None
        self.apache_error = None
        if self.p.apache:
            if not (shutil.which("apache2") and (Path("/usr/lib/apache2/modules/mod_auth_openidc.so").exists())):
                self.apache_error = "apache2 / libapache2-mod-auth-openidc not installed"
            else:
                self.apache = self.track(ApacheProc(self.wd))
                self.apache_client = {
                    "client_id": "apache-bench",
                    "client_secret": os.urandom(32).hex(),
                    "redirect_uris": [self.apache.redirect_uri],
                    "post_logout_redirect_uris": [self.apache.origin + "/"],
                    "token_endpoint_auth_method": "client_secret_basic",
                    "id_token_signed_response_alg": "RS256",
                    "grant_types": ["authorization_code"],
                    "response_types": ["code"],
                }
                self.provider.add_clients(self.apache_client)
        else:
            self.apache_error = "skipped in smoke mode (BENCH_SMOKE_APACHE=1 to include it)"

    def start_fronts(self, workers: int):
        """(Re)starts every front with `workers` worker processes, logs in where needed and
        checks what the upstream sees. Returns {setup: (url, headers)}."""
        up, rp = self.upstream.port, self.responder.port
        for f in self.front.values():
            f.stop()
        if self.apache:
            self.apache.stop()
        fa = self.front["authentik"]
        self.front["baseline"].start(baseline_http(up), workers)
        fa.start(authentik_http(up, self.provider, self.client, fa.origin), workers)
        fm = self.front["authentik_metrics"]
        fm.start(authentik_http(up, self.provider, self.client, fm.origin, metrics=True), workers)
        self.front["auth_request"].start(auth_request_http(up, rp), workers)
        fs = self.front["store"]
        fs.start(authentik_http(up, self.provider, self.client, fs.origin, store=self.redis.url), workers)
        targets = {}
        plain_ok(self.front["baseline"].origin + "/")

        cookie = login_cookie(fa.origin + "/", self.cookie_name)
        self.session_cookie = cookie
        seen = check_upstream_sees(fa.origin + "/echo", {self.cookie_name: cookie},
                                   {"username": "alice", "groups": "admins|users", "jwt": True})
        if self.cookie_name in seen.get("cookie", ""):
            raise RuntimeError("the session cookie reached the upstream")
        self.res["access_token_len"] = len(seen["jwt"])
        self.res["groups_value"] = seen["groups"]
        plain_ok(fa.origin + "/", {self.cookie_name: cookie})
        # Every nginx set-up gets the same request bytes (the browser sends its cookie anyway); only
        # set-up 2 reads it.
        same = {"Cookie": f"{self.cookie_name}={cookie}"}
        targets["baseline"] = (self.front["baseline"].origin + "/", same)
        targets["authentik"] = (fa.origin + "/", same)
        # set-up 2b: the same front, authenticated by the access token as a Bearer header
        # (introspected once at the provider, then answered from the zone's cache; the cache
        # entry lives 60 s, so a long run introspects again once a minute)
        bearer = {"Authorization": f"Bearer {seen['jwt']}"}
        plain_ok(fa.origin + "/", headers=bearer)
        seen_b = check_upstream_sees(fa.origin + "/echo", {}, {"uid": True}, headers=bearer)
        if seen_b.get("authorization"):
            raise RuntimeError("the Authorization header reached the upstream")
        targets["authentik_bearer"] = (fa.origin + "/", bearer)
        # set-up 2m: its own session (same length, so the same request size)
        mcookie = login_cookie(fm.origin + "/", self.cookie_name)
        plain_ok(fm.origin + "/", {self.cookie_name: mcookie})
        targets["authentik_metrics"] = (fm.origin + "/", {"Cookie": f"{self.cookie_name}={mcookie}"})

        store_cookie = login_cookie(fs.origin + "/", self.cookie_name)
        plain_ok(fs.origin + "/", {self.cookie_name: store_cookie})
        targets["store"] = (fs.origin + "/", {"Cookie": f"{self.cookie_name}={store_cookie}"})

        fr = self.front["auth_request"]
        check_upstream_sees(fr.origin + "/echo", {}, {"username": "alice", "groups": "admins|users"})
        targets["auth_request"] = (fr.origin + "/", same)

        if self.apache and not self.apache_error:
            try:
                self.apache.start(up, self.provider.issuer, self.apache_client, processes=workers)
                ac = login_cookie(self.apache.origin + "/", "mod_auth_openidc_session")
                check_upstream_sees(self.apache.origin + "/echo", {"mod_auth_openidc_session": ac},
                                    {"oidc_username": "alice"})
                plain_ok(self.apache.origin + "/", {"mod_auth_openidc_session": ac})
                targets["apache"] = (self.apache.origin + "/", {"Cookie": f"mod_auth_openidc_session={ac}"})
            except Exception as e:
                self.apache_error = f"{e}"
                log(f"Apache + mod_auth_openidc NOT measured: {e}")
                self.apache.stop()
        return targets

    def front_of(self, setup: str):
        """The front nginx of `setup` (2b shares set-up 2's)."""
        return self.front["authentik" if setup == "authentik_bearer" else setup]

    def front_pids(self, setup: str):
        if setup == "apache":
            return self.apache.pids()
        return self.front_of(setup).pids()

    def front_workers(self, setup: str):
        if setup == "apache":
            return self.apache.pids()  # every Apache process (the parent does no request work)
        return self.front_of(setup).workers()

    def helper_pids(self):
        return self.upstream.pids() + self.responder.pids() + ([self.provider.proc.pid] if self.provider.proc else [])

    def pin(self, percore: bool):
        fronts = []
        for s in self.front:
            fronts += self.front[s].pids()
        if self.apache and self.apache.proc:
            fronts += self.apache.pids()
        if percore:
            set_affinity(fronts, FRONT_CPU)
            set_affinity(self.helper_pids(), OTHER_CPU)
        else:
            set_affinity(fronts, None)
            set_affinity(self.helper_pids(), None)

    def quiet(self, run):
        """Runs `run()` (a measurement returning a dict with `foreign_cores`) again, up to twice,
        while other processes used more than NOISE_CORES of CPU during it, within a budget for the
        whole bench. Superseded attempts stay in the raw data, marked `discarded`."""
        for attempt in range(3):
            r = run()
            if r["foreign_cores"] <= NOISE_CORES or attempt == 2 or self.retry_budget <= 0:
                return r
            self.retry_budget -= 1
            r["discarded"] = "noisy"
            log(f"    ({r.get('setup')} {r.get('kind')}: {r['rps']:.0f} req/s, other load {r['foreign_cores']:.2f} "
                f"cores: run discarded, again in 5 s)")
            time.sleep(5)
        return r

    def measure(self, *args, **kw) -> dict:
        return self.quiet(lambda: self.measure_once(*args, **kw))

    def measure_once(self, setup: str, url: str, headers: dict, duration: float, percore: bool, script=None,
                     conns=None, kind="max", workers=1, extra=None) -> dict:
        workers_pids = self.front_workers(setup)
        helpers = self.upstream.workers() + self.responder.workers()
        b0, _ = machine_busy()
        c0 = cpu_of(workers_pids)
        h0 = cpu_of(helpers)
        t0 = time.monotonic()
        r = wrk(url, script or self.script, duration, conns or self.p.conns, self.p.threads, headers,
                cpus=OTHER_CPU if percore else None)
        wall = time.monotonic() - t0
        c1 = cpu_of(workers_pids)
        h1 = cpu_of(helpers)
        b1, _ = machine_busy()
        front_cpu = c1 - c0
        r.update({
            "setup": setup, "kind": kind, "workers": workers, "percore": percore,
            "front_cpu_s": front_cpu,
            "front_us_per_req": front_cpu / r["requests"] * 1e6 if r["requests"] else None,
            "front_util": front_cpu / (r["duration_us"] / 1e6),
            "helpers_us_per_req": (h1 - h0) / r["requests"] * 1e6 if r["requests"] else None,
            "wrk_us_per_req": r["wrk_cpu"] / r["requests"] * 1e6 if r["requests"] else None,
            # machine CPU not used by the processes of this run (other work on the machine), in cores
            "foreign_cores": max(0.0, ((b1 - b0) - front_cpu - (h1 - h0) - r["wrk_cpu"]) / wall),
        })
        if extra:
            r.update(extra)
        self.res["runs"].append(r)
        flag = f" ERRORS {r['errors']}" if r["errors"] else ""
        log(f"  {SHORT[setup]} {setup:<12} w={workers} {kind:<5} {r['rps']:>9.0f} req/s  p50 {us(r['p50'])}  "
            f"p99 {us(r['p99'])}  front {r['front_us_per_req']:.2f} µs/req ({r['front_util'] * 100:.0f}% busy)  "
            f"other load {r['foreign_cores']:.2f} cores{flag}")
        if r["errors"] and r["requests"] and r["errors"] > 0.001 * r["requests"]:
            raise RuntimeError(f"{setup}: {r['errors']} errors in {r['requests']} requests")
        return r

    # --- 1. throughput, latency, CPU per request ---
    def throughput(self):
        for workers in (1, 2):
            percore = workers == 1
            log(f"throughput: front with {workers} worker(s){' pinned to CPU 1, load on CPU 0' if percore else ''}")
            targets = self.start_fronts(workers)
            self.pin(percore)
            setups = [s for s in SETUPS if s in targets]
            for s in setups:
                url, hdr = targets[s]
                wrk(url, self.script, self.p.warmup, self.p.conns, self.p.threads, hdr,
                    cpus=OTHER_CPU if percore else None)
            for rep in range(self.p.reps):
                for s in setups:
                    url, hdr = targets[s]
                    self.measure(s, url, hdr, self.p.duration, percore, workers=workers,
                                 extra={"rep": rep})
            # the session must still be valid after the runs
            plain_ok(targets["authentik"][0], {self.cookie_name: self.session_cookie})
            self.check_metrics(workers)
            if percore:
                self.paced(targets)
        for f in self.front.values():
            f.stop()
        if self.apache:
            self.apache.stop()

    def check_metrics(self, workers: int):
        """Set-up 2m counted every request it served: its sessions counter against wrk's totals."""
        text = requests.get(self.front["authentik_metrics"].origin + "/metrics", timeout=10).text
        m = re.search(r'^authentik_requests_total\{provider="main",outcome="session"\} (\d+)$', text, re.M)
        counted = int(m.group(1)) if m else None
        sent = sum(r["requests"] for r in self.res["runs"]
                   if r["setup"] == "authentik_metrics" and r["workers"] == workers)
        self.res.setdefault("metrics_check", {})[str(workers)] = {"counted": counted, "wrk_requests": sent}
        log(f"  2m counted {counted} session requests; wrk completed {sent} in the measured runs (plus warm-up)")
        if counted is None or counted < sent:
            raise RuntimeError(f"set-up 2m counted {counted} session requests, fewer than wrk's {sent}")

    def paced(self, targets):
        """p50/p99 at a fixed moderate rate: half of the baseline's maximum (1 worker)."""
        base = med([r["rps"] for r in self.res["runs"] if r["setup"] == "baseline" and r["kind"] == "max"
                    and r["workers"] == 1 and not r.get("discarded")])
        rate = base / 2
        delay = self.p.paced_delay_ms
        # wrk paces each connection with a fixed pause before every request (wrk's Lua `delay`):
        # rate ~= connections / (delay + latency). Calibrated once on the baseline, then the same
        # connections and pause are used for every set-up.
        conns = max(1, round(rate * delay / 1000))
        script = wrk_script(self.wd, delay)
        url, hdr = targets["baseline"]
        cal = wrk(url, script, 2, conns, 1, hdr, cpus=OTHER_CPU)
        if cal["rps"] > 0:
            conns = max(1, round(conns * rate / cal["rps"]))
        log(f"fixed rate: target {rate:.0f} req/s (half of baseline max {base:.0f}) -> wrk -c{conns} with a "
            f"{delay} ms pause per request and connection")
        self.res["paced"] = {"target_rps": rate, "conns": conns, "delay_ms": delay, "baseline_max": base}
        maxes = {s: med([r["rps"] for r in self.res["runs"] if r["setup"] == s and r["kind"] == "max"
                         and r["workers"] == 1 and not r.get("discarded")]) for s in targets}
        over = {s: m for s, m in maxes.items() if m is not None and m < 1.25 * rate}
        self.res["paced"]["over_capacity"] = over
        for s, m in over.items():
            log(f"  {SHORT[s]} {s}: not run at this rate (its maximum is {m:.0f} req/s: it would measure queueing)")
        for rep in range(1 if self.p.smoke else 2):
            for s in SETUPS:
                if s in targets and s not in over:
                    url, hdr = targets[s]
                    self.measure(s, url, hdr, self.p.paced_duration, True, script=script, conns=conns,
                                 kind="paced", workers=1, extra={"rep": rep})

    # --- 1b. set-up 5: an L1 miss served from the store ---
    def store_miss(self):
        """Latency of requests whose session is in the store but not in the zone (the first
        request of a user on a node), against the same requests once the zone has them (L1
        hits), sequentially on one keep-alive connection, 1 worker."""
        n = 200 if self.p.smoke else 3000
        fs = self.front["store"]
        fs.stop()
        fs.start(authentik_http(self.upstream.port, self.provider, self.client, fs.origin, store=self.redis.url), 1)
        cookie = login_cookie(fs.origin + "/", self.cookie_name)
        src = "authentik:s:" + base64.urlsafe_b64decode(cookie + "=").hex()
        ids = [os.urandom(32) for _ in range(n)]
        cmds = "".join(f"COPY {src} authentik:s:{i.hex()}\n" for i in ids)
        subprocess.run([harness.Redis.CLI, "-p", str(self.redis.port)], input=cmds, text=True, check=True,
                       capture_output=True)
        values = [base64.urlsafe_b64encode(i).rstrip(b"=").decode() for i in ids]
        conn = http.client.HTTPConnection("127.0.0.1", fs.port, timeout=10)

        def once(value):
            t0 = time.perf_counter()
            conn.request("GET", "/", headers={"Cookie": f"{self.cookie_name}={value}"})
            resp = conn.getresponse()
            resp.read()
            took = time.perf_counter() - t0
            if resp.status != 200:
                raise RuntimeError(f"store L1 miss: status {resp.status}")
            return took * 1e6

        for v in values[:20]:  # warm-up (connections to the store, the thread pool)
            once(v)
        miss = sorted(once(v) for v in values[20:])
        hit = sorted(once(v) for v in values[20:])
        conn.close()

        def pct(xs, q):
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        r = {"n": len(miss), "miss_p50": pct(miss, 0.5), "miss_p99": pct(miss, 0.99),
             "hit_p50": pct(hit, 0.5), "hit_p99": pct(hit, 0.99)}
        r["added_p50"] = r["miss_p50"] - r["hit_p50"]
        self.res["store_miss"] = r
        log(f"store L1 miss: p50 {us(r['miss_p50'])} p99 {us(r['miss_p99'])}; the same requests as L1 hits: "
            f"p50 {us(r['hit_p50'])} p99 {us(r['hit_p99'])}; a miss adds {us(r['added_p50'])} at p50")
        fs.stop()

    # --- 2. callgrind ---
    def callgrind(self):
        n = self.p.callgrind_n
        out = {}
        runs = (("baseline", self.cg_base), ("authentik", self.cg_front), ("authentik_metrics", self.cg_front))
        for name, front in runs:
            log(f"callgrind: {name}, {n} sequential keep-alive requests on one connection")
            outfile = self.wd / f"callgrind.{name}.out"
            conf = (baseline_http(self.upstream.port) if name == "baseline" else
                    authentik_http(self.upstream.port, self.provider, self.client, front.origin,
                                   metrics=name == "authentik_metrics"))
            front.start(conf, 1, master=False, timeout=90,
                        wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}",
                                 "--dump-instr=no", "--collect-jumps=no"])
            try:
                # same request bytes as set-up 2 (a session cookie of the same name and length)
                hdr = {"Cookie": f"{self.cookie_name}={getattr(self, 'session_cookie', 'x' * 43)}"}
                if name != "baseline":
                    cookie = login_cookie(front.origin + "/", self.cookie_name, timeout=120)
                    hdr = {"Cookie": f"{self.cookie_name}={cookie}"}
                conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)

                def run(k):
                    for _ in range(k):
                        conn.request("GET", "/", headers=hdr)
                        resp = conn.getresponse()
                        body = resp.read()
                        if resp.status != 200 or body != b"ok":
                            raise RuntimeError(f"callgrind {name}: {resp.status} {body[:200]!r}")

                run(50)
                subprocess.run(["callgrind_control", "-z", str(front.proc.pid)], check=True, capture_output=True,
                               timeout=60)
                run(n)
                subprocess.run(["callgrind_control", "-d", str(front.proc.pid)], check=True, capture_output=True,
                               timeout=60)
                conn.close()
            finally:
                front.stop()
            dumps = sorted(self.wd.glob(f"callgrind.{name}.out.*"))
            if not dumps:
                raise RuntimeError(f"callgrind {name}: no dump written")
            out[name] = analyse_callgrind(dumps[-1], n)
            log(f"  {name}: {out[name]['total_per_req']:.0f} instructions/request")
        a, b = out["authentik"], out["baseline"]
        out["n"] = n
        out["delta_per_req"] = a["total_per_req"] - b["total_per_req"]
        out["metrics_delta_per_req"] = out["authentik_metrics"]["total_per_req"] - a["total_per_req"]
        self.res["callgrind"] = out
        log(f"  module: access_handler inclusive {a.get('access_handler_per_req', 0):.0f} instr/request; "
            f"total +{out['delta_per_req']:.0f} over baseline")

    # --- 3. session store scale ---
    def scale(self):
        if not BENCH_MODULE.exists():
            msg = "build/bench/ngx_http_authentik_module.so not built (make bench-module): session-store scale not measured"
            if self.p.smoke:
                self.res["notes"].append(msg)
                log(msg)
                return
            raise RuntimeError(msg)
        up = self.upstream.port
        sf = self.scale_front

        def fill(cookie, n):
            r = requests.get(sf.origin + "/outpost.goauthentik.io/bench/fill", params={"n": n},
                             cookies={self.cookie_name: cookie}, timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"bench fill: {r.status_code} {r.text[:200]}")
            return {k: int(v) for k, v in (line.split() for line in r.text.splitlines() if line.strip())}

        # calibration: bytes per session from free-page deltas
        sf.start(authentik_http(up, self.provider, self.client, sf.origin, "256m"), 1)
        cookie = login_cookie(sf.origin + "/", self.cookie_name)
        s0 = fill(cookie, 0)
        k = 5000
        s1 = fill(cookie, k)
        per = (s0["free_pages"] - s1["free_pages"]) * 4096 / k
        sf.stop()
        cal = {"record_bytes": s1["record_bytes"], "bytes_per_session": per, "calibration_sessions": k}
        biggest = max(self.p.scale_sizes)
        need = biggest * per * 1.02 + 64 * 2**20
        zone_mib = int(math.ceil(need / 2**20 / 64) * 64)
        cal["zone_mib"] = zone_mib
        log(f"scale: real session record {s1['record_bytes']} bytes -> {per:.0f} bytes of zone per session; "
            f"zone {zone_mib} MiB for {biggest} sessions")
        self.res["scale"] = {"calibration": cal, "sizes": []}
        sf.start(authentik_http(up, self.provider, self.client, sf.origin, f"{zone_mib}m"), 1, timeout=60)
        set_affinity(sf.pids(), FRONT_CPU)
        set_affinity(self.helper_pids(), OTHER_CPU)
        try:
            cookie = login_cookie(sf.origin + "/", self.cookie_name)
            hdr = {"Cookie": f"{self.cookie_name}={cookie}"}
            st = fill(cookie, 0)
            evicted = 0
            for size in self.p.scale_sizes:
                t0 = time.monotonic()
                while st["sessions"] < size:
                    st = fill(cookie, min(self.p.fill_batch, size - st["sessions"]))
                    evicted += st["evicted"]
                    plain_ok(sf.origin + "/", {self.cookie_name: cookie})  # keep the real session fresh
                fill_s = time.monotonic() - t0
                if evicted:
                    raise RuntimeError(f"scale: {evicted} sessions evicted while filling to {size}")
                wrk(sf.origin + "/", self.script, self.p.warmup, self.p.conns, 1, hdr, cpus=OTHER_CPU)
                runs = []
                for rep in range(1 if self.p.smoke else 2):
                    runs.append(self.quiet(lambda: self.scale_measure(hdr, size, rep)))
                used = (st["total_pages"] - st["free_pages"]) * 4096
                row = {
                    "sessions": st["sessions"], "fill_s": fill_s, "used_bytes": used,
                    "rps": med([r["rps"] for r in runs]), "p50": med([r["p50"] for r in runs]),
                    "p99": med([r["p99"] for r in runs]),
                    "front_us_per_req": med([r["front_us_per_req"] for r in runs]),
                    "foreign_cores": med([r["foreign_cores"] for r in runs]),
                }
                self.res["scale"]["sizes"].append(row)
                log(f"  {st['sessions']:>8} sessions: {row['rps']:.0f} req/s p50 {us(row['p50'])} p99 "
                    f"{us(row['p99'])} front {row['front_us_per_req']:.2f} µs/req; zone used "
                    f"{used / 2**20:.0f} MiB (filled in {fill_s:.1f} s)")
        finally:
            sf.stop()

    def scale_measure(self, hdr, size, rep):
        sf = self.scale_front
        helpers = self.upstream.workers()
        b0, _ = machine_busy()
        c0 = cpu_of(sf.workers())
        h0 = cpu_of(helpers)
        t0 = time.monotonic()
        r = wrk(sf.origin + "/", self.script, self.p.scale_duration, self.p.conns, 1, hdr, cpus=OTHER_CPU)
        wall = time.monotonic() - t0
        c1 = cpu_of(sf.workers())
        h1 = cpu_of(helpers)
        b1, _ = machine_busy()
        if r["errors"]:
            raise RuntimeError(f"scale {size}: {r['errors']} errors (session lost?)")
        r["front_us_per_req"] = (c1 - c0) / r["requests"] * 1e6
        r["front_util"] = (c1 - c0) / (r["duration_us"] / 1e6)
        r["foreign_cores"] = max(0.0, ((b1 - b0) - (c1 - c0) - (h1 - h0) - r["wrk_cpu"]) / wall)
        r.update({"setup": "scale", "sessions": size, "rep": rep, "kind": "scale", "workers": 1})
        self.res["runs"].append(r)
        return r

    # --- 4. login cost ---
    def logins(self):
        f = self.front["authentik"]
        f.start(authentik_http(self.upstream.port, self.provider, self.client, f.origin), 1)
        set_affinity(f.pids() + self.helper_pids(), None)
        try:
            login_cookie(f.origin + "/", self.cookie_name)  # discovery fetched, warm
            n = self.p.login_clients
            log(f"login cost: {n} concurrent clients, fresh browser per login, {self.p.login_seconds} s")
            ng0 = cpu_of(f.workers())
            pv0 = cpu_of([self.provider.proc.pid])
            t0 = time.monotonic()
            with concurrent.futures.ProcessPoolExecutor(n) as ex:
                futs = [ex.submit(login_loop, f.origin + "/", self.cookie_name, self.p.login_seconds)
                        for _ in range(n)]
                results = [x.result() for x in futs]
            wall = time.monotonic() - t0
            ng1 = cpu_of(f.workers())
            pv1 = cpu_of([self.provider.proc.pid])
            ok = sum(r[0] for r in results)
            failed = sum(r[1] for r in results)
            cli = sum(r[2] for r in results)
            if ok == 0:
                raise RuntimeError(f"login cost: no login succeeded: {[r[3] for r in results]}")
            self.res["logins"] = {
                "clients": n, "seconds": wall, "ok": ok, "failed": failed, "per_s": ok / wall,
                "nginx_cpu_ms_per_login": (ng1 - ng0) / ok * 1000,
                "provider_cpu_ms_per_login": (pv1 - pv0) / ok * 1000,
                "client_cpu_ms_per_login": cli / ok * 1000,
                "errors": [r[3] for r in results if r[3]][:3],
            }
            L = self.res["logins"]
            log(f"  {ok} logins in {wall:.1f} s = {L['per_s']:.1f}/s ({failed} failed); CPU per login: nginx "
                f"{L['nginx_cpu_ms_per_login']:.2f} ms, provider {L['provider_cpu_ms_per_login']:.2f} ms, "
                f"clients {L['client_cpu_ms_per_login']:.2f} ms")
        finally:
            f.stop()


def login_loop(url: str, cookie_name: str, seconds: float):
    """One client process: full logins (start -> provider form -> callback -> upstream) with a
    fresh browser each time, until `seconds` have passed. Returns (ok, failed, cpu_s, error)."""
    import resource as _r
    ok = failed = 0
    err = ""
    t_end = time.monotonic() + seconds
    c0 = _r.getrusage(_r.RUSAGE_SELF)
    while time.monotonic() < t_end:
        try:
            login_cookie(url, cookie_name)
            ok += 1
        except Exception as e:  # noqa: BLE001
            failed += 1
            err = str(e)[:300]
    c1 = _r.getrusage(_r.RUSAGE_SELF)
    return ok, failed, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), err


# --- callgrind analysis ------------------------------------------------------------------------------
LINE_RE = re.compile(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(.*?)\s*$")


def annotate(path: Path, inclusive: bool) -> tuple[int, list[tuple[int, str]]]:
    cmd = ["callgrind_annotate", "--threshold=100", "--auto=no", f"--inclusive={'yes' if inclusive else 'no'}", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    total = 0
    rows = []
    for line in out.splitlines():
        m = LINE_RE.match(line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        what = m.group(2)
        if what == "PROGRAM TOTALS":
            total = ir
        elif ":" in what:
            rows.append((ir, what))
    return total, rows


def short_fn(what: str) -> str:
    # "file:function [object]" -> "function (object basename)"
    m = re.match(r"^(.*?):(.*?)(?: \[(.*)\])?$", what)
    if not m:
        return what
    fn, obj = m.group(2), m.group(3) or ""
    fn = re.sub(r"::h[0-9a-f]{16}$", "", fn)
    name = Path(obj).name
    return f"{fn} [{'module' if name == MODULE.name else name}]" if obj else fn


def analyse_callgrind(path: Path, n: int) -> dict:
    total, incl = annotate(path, True)
    _, excl = annotate(path, False)
    mod = "ngx_http_authentik_module"
    obj = f"{MODULE.name}]"  # the module's object file (a snapshot copy, see main)
    res = {"total": total, "total_per_req": total / n, "file": str(path)}
    ah = [ir for ir, w in incl if "access_handler" in w and mod in w]
    res["access_handler_per_req"] = (max(ah) / n) if ah else 0.0
    dc = [ir for ir, w in incl if "handler::drop_ctx" in w]
    res["drop_ctx_per_req"] = (max(dc) / n) if dc else 0.0
    # self cost inside the module's own object (Rust code, inlined core code), per request
    res["module_self_per_req"] = sum(ir for ir, w in excl if w.endswith(obj)) / n
    top_mod = sorted(((ir, short_fn(w)) for ir, w in incl if w.endswith(obj)), reverse=True)[:25]
    res["module_top_inclusive"] = [(ir / n, w) for ir, w in top_mod]
    res["top_exclusive"] = [(ir / n, short_fn(w)) for ir, w in sorted(excl, reverse=True)[:20]]
    for name in ("malloc", "free", "realloc", "memcpy", "__memcpy_avx_unaligned_erms", "memmove"):
        hits = [ir for ir, w in incl if re.search(rf":(?:__libc_)?{name}(?:@\S*)? \[", w)]
        if hits:
            res[f"incl_{name}_per_req"] = max(hits) / n
    return res


# --- report ----------------------------------------------------------------------------------------------
def summarise(res: dict) -> dict:
    s = {}
    for workers in (1, 2):
        for setup in SETUPS:
            rs = [r for r in res["runs"] if r["setup"] == setup and r["kind"] == "max" and r["workers"] == workers
                  and not r.get("discarded")]
            if rs:
                s[(setup, workers)] = {
                    "rps": med([r["rps"] for r in rs]),
                    "p50": med([r["p50"] for r in rs]),
                    "p99": med([r["p99"] for r in rs]),
                    "front_us": med([r["front_us_per_req"] for r in rs]),
                    "util": med([r["front_util"] for r in rs]),
                    "foreign": max(r["foreign_cores"] for r in rs),
                    "rps_all": [round(r["rps"]) for r in rs],
                    "foreign_all": [round(r["foreign_cores"], 2) for r in rs],
                    "front_us_all": [round(r["front_us_per_req"], 2) for r in rs],
                }
        for setup in SETUPS:
            rs = [r for r in res["runs"] if r["setup"] == setup and r["kind"] == "paced" and not r.get("discarded")]
            if rs:
                s[(setup, "paced")] = {
                    "rps": med([r["rps"] for r in rs]), "p50": med([r["p50"] for r in rs]),
                    "p99": med([r["p99"] for r in rs]), "p999": med([r["p999"] for r in rs]),
                    "p99_all": [round(r["p99"]) for r in rs],
                    "foreign": max(r["foreign_cores"] for r in rs),
                    "front_us": med([r["front_us_per_req"] for r in rs]),
                }
    return s


def paired(res: dict, a: str, b: str, key: str, op, workers: int = 1) -> list[float]:
    """op(a's run, b's run) for each repetition in which both were measured (the runs of one
    repetition are back to back, so they share the machine's conditions)."""
    def by_rep(setup):
        return {r.get("rep"): r[key] for r in res["runs"] if r["setup"] == setup and r["kind"] == "max"
                and r["workers"] == workers and not r.get("discarded")}
    ra, rb = by_rep(a), by_rep(b)
    return [op(ra[k], rb[k]) for k in sorted(ra, key=str) if k in rb]


TYPICAL_TEST = "typical_authentik_session_fits_a_2k_slot"
TYPICAL_MAX_RECORD = 2048 - 144  # what that core test asserts (src/store/entry.rs: Entry <= 144 bytes)


def run_typical_test() -> dict:
    """Runs the core crate's test that encodes a typical authentik session (10 groups, a 1 KB
    JWT access token) with the module's own encoder and asserts the record fits a 2 KB slab slot
    with the zone's entry header. Run after all measurements (it may compile)."""
    env = {**os.environ, "CARGO_TARGET_DIR": str(REPO / "build" / "target-debian")}
    cmd = ["cargo", "test", "--locked", "--release", "-p", "authentik-core", "--lib", TYPICAL_TEST]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"status": "error", "detail": str(e)[:300]}
    out = r.stdout + r.stderr
    if re.search(r"test result: ok\. [1-9]\d* passed", out):
        return {"status": "passed"}
    if re.search(r"test result: ok\. 0 passed", out):
        return {"status": "absent", "detail": f"no test named {TYPICAL_TEST} in authentik-core"}
    return {"status": "failed", "detail": out[-800:]}


def typical_session(res: dict) -> dict | None:
    """Zone bytes per session with a typical authentik claim set (see bench/README.md): the
    record size bound comes from core's test (the module's own encoder), the cost of a slab slot
    of that size from the measured zone (free pages)."""
    sc = res.get("scale")
    t = res.get("typical_test")
    if not sc or not t:
        return None
    cal = sc["calibration"]
    real_alloc = 144 + cal["record_bytes"]
    out = {"test": t, "real_alloc_bytes": real_alloc}
    if t.get("status") != "passed":
        return out
    slot = 2048  # record <= 1904 bytes + the <= 144-byte entry header
    if real_alloc <= 2048 and cal["record_bytes"] > 0 and 1024 < real_alloc:
        per = cal["bytes_per_session"]  # the real session uses the same slot size: measured cost
        how = "measured (the real session takes the same 2 KB slot)"
    else:
        per = slot * (1 + 24 / 4096)  # 2 slots per page + the page descriptor
        how = "computed (2 KB slot, 24-byte page descriptor per 4 KiB page)"
    out.update({"record_max": TYPICAL_MAX_RECORD, "slot": slot, "bytes_per_session": per, "how": how,
                "zone_1m_gib": per * 1_000_000 / 2**30})
    return out


def render(res: dict) -> str:
    f = res["facts"]
    p = res["params"]
    s = summarise(res)
    L = []
    L.append("# nginx-authentik benchmark results" + (" (SMOKE RUN: tiny durations, not figures)" if p["smoke"] else ""))
    L.append("")
    L.append(f"- Date: {f['date']}; commit {f['git']}")
    L.append(f"- Machine: {f['nproc']} CPUs ({f['cpu']}), {f['mem_mib']} MiB RAM, Linux {f['kernel']}; "
             f"load average at start {' '.join(f['loadavg_start'])}, at end {' '.join(f.get('loadavg_end', []))}")
    L.append(f"- Servers: {f['nginx']} (Debian), Apache {f['apache'] or 'n/a'} + mod_auth_openidc "
             f"{f['mod_auth_openidc'] or 'n/a'}; wrk {f['wrk']}")
    L.append(f"- Load: `wrk -t{p['threads']} -c{p['conns']} -d{p['duration']}s --latency`, {p['reps']} runs per "
             f"set-up interleaved (medians shown); keep-alive everywhere (client, upstream). Set-ups 1-3 get "
             f"the same request (GET / with set-up 2's session cookie); set-up 4 its own session cookie.")
    L.append("- 1 worker (per core): the front server (nginx worker, or Apache: 1 mpm_event process x 128 threads) "
             "pinned to CPU 1; wrk, the upstream nginx and the auth responder pinned to CPU 0. "
             "2 workers (whole machine): nothing pinned, Apache 2 processes.")
    L.append("- Command: `make bench` (bench/run.sh). Raw data: bench/results/latest.json.")
    L.append("")

    def row(setup, w):
        x = s.get((setup, w))
        if not x:
            return f"| {LABEL[setup]} | not measured | | | | |"
        cpu = f"{x['front_us']:.2f}" if w == 1 and x["front_us"] is not None else "-"
        return (f"| {LABEL[setup]} | {x['rps']:,.0f} | {us(x['p50'])} | {us(x['p99'])} | {cpu} | "
                f"{x['util']:.2f} |")

    for w in (1, 2):
        L.append(f"## Throughput and latency, {w} front worker{'s' if w > 1 else ''} "
                 f"({'per core' if w == 1 else 'whole machine'}), saturated")
        L.append("")
        L.append("| set-up | req/s | p50 | p99 | front CPU µs/req | front CPU used (cores) |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for setup in SETUPS:
            L.append(row(setup, w))
        L.append("")
        rat = []
        pr = paired(res, "authentik", "baseline", "rps", lambda x, y: x / y, w)
        if pr:
            L.append(f"2/1 per repetition (set-up 2 against the set-up 1 run just before it): "
                     f"{[round(x, 2) for x in pr]}, median **{statistics.median(pr):.2f}**")
            L.append("")
        pb = paired(res, "authentik_bearer", "authentik", "rps", lambda x, y: x / y, w)
        if pb:
            L.append(f"2b/2 per repetition (a cached Bearer header against a session cookie, same front): "
                     f"{[round(x, 2) for x in pb]}, median **{statistics.median(pb):.2f}**")
            L.append("")
        pm = paired(res, "authentik_metrics", "authentik", "rps", lambda x, y: x / y, w)
        if pm:
            L.append(f"2m/2 (metrics on against off) per repetition: {[round(x, 2) for x in pm]}, median "
                     f"**{statistics.median(pm):.2f}**")
            L.append("")
        two = s.get(("authentik", w))
        for other in ("baseline", "auth_request", "apache"):
            o = s.get((other, w))
            if two and o:
                rat.append(f"2/{SHORT[other]} = **{two['rps'] / o['rps']:.2f}**")
            else:
                rat.append(f"2/{SHORT[other]} = not measured")
        five = s.get(("store", w))
        rat.append(f"5/2 = **{five['rps'] / two['rps']:.2f}**" if five and two else "5/2 = not measured")
        L.append("Ratios of the medians (req/s): " + ", ".join(rat))
        L.append("")
    if res.get("apache_error"):
        L.append(f"Set-up 4 (Apache + mod_auth_openidc): **not measured**: {res['apache_error']}")
        L.append("")

    sm = res.get("store_miss")
    if sm:
        L.append("## Set-up 5: an L1 miss served from the store (1 worker, sequential, one keep-alive connection)")
        L.append("")
        L.append("| requests | L1 miss p50 | L1 miss p99 | same requests as L1 hits p50 | p99 | added by the miss (p50) |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        L.append(f"| {sm['n']} | {us(sm['miss_p50'])} | {us(sm['miss_p99'])} | {us(sm['hit_p50'])} | "
                 f"{us(sm['hit_p99'])} | {us(sm['added_p50'])} |")
        L.append("")
    b1, a1 = s.get(("baseline", 1)), s.get(("authentik", 1))
    L.append("## CPU per request of the front nginx (1 worker)")
    L.append("")
    L.append("utime+stime of the worker process (/proc/PID/stat) over each fixed run, divided by the "
             "requests of that run (includes the kernel's work for both sockets).")
    L.append("")
    if b1 and a1:
        L.append(f"- set-up 1: {b1['front_us']:.2f} µs/req (runs: {b1['front_us_all']})")
        L.append(f"- set-up 2: {a1['front_us']:.2f} µs/req (runs: {a1['front_us_all']})")
        d = paired(res, "authentik", "baseline", "front_us_per_req", lambda x, y: x - y)
        L.append(f"- difference of the medians: **{a1['front_us'] - b1['front_us']:+.2f} µs/req**; per repetition "
                 f"(set-up 2 minus the set-up 1 run just before it): {[round(x, 2) for x in d]}, median "
                 f"**{statistics.median(d):+.2f} µs/req**" if d else "")
        a3 = s.get(("auth_request", 1))
        if a3:
            L.append(f"- set-up 3 for comparison: {a3['front_us']:.2f} µs/req "
                     f"({a3['front_us'] - b1['front_us']:+.2f} over set-up 1, front only; the responder's own CPU is extra)")
    L.append("")
    cg = res.get("callgrind")
    if cg:
        a, b = cg["authentik"], cg["baseline"]
        L.append(f"## Instructions per request (callgrind, 1 nginx process, {cg['n']} sequential keep-alive requests)")
        L.append("")
        L.append("User-space instructions only (valgrind does not see the kernel).")
        L.append("")
        L.append("| | instructions/request |")
        L.append("|---|---:|")
        L.append(f"| set-up 1 (no module) total | {b['total_per_req']:,.0f} |")
        L.append(f"| set-up 2 total | {a['total_per_req']:,.0f} |")
        L.append(f"| difference | {cg['delta_per_req']:+,.0f} ({cg['delta_per_req'] / b['total_per_req'] * 100:+.1f}%) |")
        if "authentik_metrics" in cg:
            m = cg["authentik_metrics"]
            L.append(f"| set-up 2m (metrics on) total | {m['total_per_req']:,.0f} |")
            L.append(f"| 2m minus 2 (counting one request) | {cg['metrics_delta_per_req']:+,.0f} |")
        L.append(f"| module access handler, inclusive (everything it calls) | {a['access_handler_per_req']:,.0f} "
                 f"({a['access_handler_per_req'] / a['total_per_req'] * 100:.1f}% of set-up 2) |")
        L.append(f"| module request-context cleanup (`drop_ctx`, at request-pool destruction), inclusive | "
                 f"{a.get('drop_ctx_per_req', 0):,.0f} |")
        L.append(f"| instructions executed in the module's own code (self) | {a['module_self_per_req']:,.0f} |")
        for name in ("malloc", "free", "realloc"):
            if f"incl_{name}_per_req" in a:
                L.append(f"| {name}() inclusive, set-up 2 / set-up 1 | {a[f'incl_{name}_per_req']:,.0f} / "
                         f"{b.get(f'incl_{name}_per_req', 0):,.0f} |")
        L.append("")
        L.append("Module functions by inclusive instructions per request (set-up 2):")
        L.append("")
        L.append("| instr/req | function |")
        L.append("|---:|---|")
        for ir, w in a["module_top_inclusive"][:15]:
            L.append(f"| {ir:,.0f} | `{w}` |")
        L.append("")

    pc = res.get("paced")
    if pc:
        L.append(f"## Latency at a fixed moderate rate (1 worker): {pc['target_rps']:,.0f} req/s target "
                 f"= half the baseline maximum")
        L.append("")
        L.append(f"wrk with a random pause of 1..{2 * pc['delay_ms'] - 1} ms (mean {pc['delay_ms']} ms) before each "
                 f"request on each of {pc['conns']} connections (wrk's Lua `delay`; calibrated once on set-up 1, "
                 f"then the same for all); latency is measured from the write of each request. wrk's timers tick "
                 f"in whole milliseconds, so requests arrive in clumps of about rate/1000 per tick and p99 "
                 f"includes the queueing of a clump (service time x clump size). "
                 f"(`hey -q` was not used: it reports latencies rounded to 0.1 ms and needs more CPU per request "
                 f"than this 2-CPU machine can spare at this rate.)")
        L.append("")
        L.append("| set-up | achieved req/s | p50 | p99 | p99.9 | p99 added over set-up 1 |")
        L.append("|---|---:|---:|---:|---:|---:|")
        bp = s.get(("baseline", "paced"))
        for setup in SETUPS:
            x = s.get((setup, "paced"))
            if not x:
                m = pc.get("over_capacity", {}).get(setup)
                why = f"not run: its maximum ({m:,.0f} req/s) is below 1.25x this rate" if m else "not measured"
                L.append(f"| {LABEL[setup]} | {why} | | | | |")
                continue
            add = f"{x['p99'] - bp['p99']:+.0f} µs" if bp else "-"
            L.append(f"| {LABEL[setup]} | {x['rps']:,.0f} | {us(x['p50'])} | {us(x['p99'])} | {us(x['p999'])} | {add} |")
        L.append("")

    sc = res.get("scale")
    if sc:
        cal = sc["calibration"]
        L.append("## Session store scale (BENCH-ONLY fill endpoint, `--features bench` build)")
        L.append("")
        L.append(f"A real session from a login, copied N-1 times under fresh ids by "
                 f"`/outpost.goauthentik.io/bench/fill` (bench build only); then wrk with the real session "
                 f"(1 worker, pinned as above). Zone `{cal['zone_mib']}m`; nothing was evicted.")
        L.append("")
        L.append("| live sessions | req/s | p50 | p99 | front CPU µs/req | zone pages used |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        for r in sc["sizes"]:
            L.append(f"| {r['sessions']:,} | {r['rps']:,.0f} | {us(r['p50'])} | {us(r['p99'])} | "
                     f"{r['front_us_per_req']:.2f} | {r['used_bytes'] / 2**20:,.0f} MiB |")
        L.append("")
        L.append(f"- Real session (alice: 2 groups, {res.get('access_token_len')}-byte opaque access token): "
                 f"record {cal['record_bytes']} bytes; measured {cal['bytes_per_session']:,.0f} bytes of zone per "
                 f"session (free-page delta over {cal['calibration_sessions']} inserts).")
        big = sc["sizes"][-1] if sc["sizes"] else None
        if big:
            L.append(f"- Zone actually used with {big['sessions']:,} real sessions: {big['used_bytes'] / 2**30:.2f} GiB.")
        t = typical_session(res)
        if t and "zone_1m_gib" in t:
            res["typical_session"] = t
            L.append(f"- Typical authentik session (10 groups, a 1 KB JWT access token): core's test `{TYPICAL_TEST}` "
                     f"(which encodes such a session with the module's own encoder) passed, so its record is at most "
                     f"{t['record_max']} bytes and with the entry header takes one {t['slot']}-byte slab slot: "
                     f"**{t['bytes_per_session']:,.0f} bytes of zone per session** ({t['how']}), "
                     f"**1M typical sessions need a {t['zone_1m_gib']:.2f} GiB zone**.")
        elif t:
            L.append(f"- Typical authentik session: not determined ({t['test'].get('status')}: "
                     f"{t['test'].get('detail', '')[:300]})")
        L.append("")

    lg = res.get("logins")
    if lg:
        L.append("## Login cost")
        L.append("")
        L.append(f"{lg['clients']} client processes, each looping full logins with a fresh browser (GET / -> 302 "
                 f"-> provider authorize -> login form -> POST -> callback on nginx -> token + userinfo on the "
                 f"module's thread pool -> session -> GET / 200), provider local, {lg['seconds']:.0f} s.")
        L.append("")
        L.append(f"- **{lg['per_s']:.1f} logins/s** ({lg['ok']} ok, {lg['failed']} failed)")
        L.append(f"- CPU per login: front nginx {lg['nginx_cpu_ms_per_login']:.2f} ms (both nginx requests of "
                 f"the login plus the final GET, thread pool included), provider (node) "
                 f"{lg['provider_cpu_ms_per_login']:.2f} ms, Python clients {lg['client_cpu_ms_per_login']:.2f} ms: "
                 f"logins/s is bounded by the provider and the client, not by nginx.")
        L.append("")

    L.append("## Targets")
    L.append("")
    for line in targets(res, s):
        L.append(f"- {line}")
    L.append("")
    L.append("## Noise")
    L.append("")
    fo = [r["foreign_cores"] for r in res["runs"] if not r.get("discarded")]
    nd = sum(1 for r in res["runs"] if r.get("discarded"))
    L.append(f"A run during which other processes used more than {NOISE_CORES} cores is repeated (at most twice, "
             f"24 repeats per bench); {nd} run(s) were discarded that way and are kept in latest.json.")
    L.append("")
    if fo:
        L.append(f"Other work on the machine during the runs (machine busy time not spent by the processes of the "
                 f"run), in cores: median {statistics.median(fo):.2f}, max {max(fo):.2f}. Runs per set-up "
                 f"(req/s, 1 worker): " + "; ".join(
                     f"{SHORT[k[0]]}: {v['rps_all']}" for k, v in s.items() if k[1] == 1))
    for n in res["notes"]:
        L.append(f"- {n}")
    L.append("")
    return "\n".join(L)


def targets(res, s) -> list[str]:
    out = []
    verdict = res.setdefault("targets", {})

    def mark(key, ok, text):
        verdict[key] = ok
        out.append(("**MET** " if ok else "**MISSED** ") + text if ok is not None else "not measured: " + text)

    b, a = s.get(("baseline", 1)), s.get(("authentik", 1))
    if b and a:
        r = a["rps"] / b["rps"]
        pr = paired(res, "authentik", "baseline", "rps", lambda x, y: x / y, 1)
        rp = statistics.median(pr) if pr else r
        noisy = max(b["foreign"], a["foreign"])
        mark("ratio_2_1", rp >= 0.95, f"2/1 >= 0.95 (module under 5% of a bare proxy): 2/1 = {rp:.2f} as the "
             f"median of the per-repetition ratios {[round(x, 2) for x in pr]} (ratio of the medians {r:.2f}; "
             f"front CPU per request predicts {b['front_us'] / a['front_us']:.2f} when the front is the limit)"
             + (f" (noisy: other load up to {noisy:.2f} cores)" if noisy > NOISE_CORES else ""))
    t3, t4 = s.get(("auth_request", 1)), s.get(("apache", 1))
    if a and t3:
        out.append(f"2/3 = {a['rps'] / t3['rps']:.2f} (expected near 1.5 if 2/1 >= 0.95)")
    if a and t4:
        out.append(f"2/4 = {a['rps'] / t4['rps']:.2f} (expected near 4)")
    elif a:
        out.append("2/4 not measured")
    if b and a:
        d = a["front_us"] - b["front_us"]
        pd = paired(res, "authentik", "baseline", "front_us_per_req", lambda x, y: x - y)
        if pd:
            d = statistics.median(pd)
        mark("cpu_delta", d <= 1.5, f"front CPU per authenticated request at most 1.5 µs above set-up 1: {d:+.2f} µs "
             f"(median of the per-repetition differences; medians {b['front_us']:.2f} -> {a['front_us']:.2f})")
    cg = res.get("callgrind")
    if cg:
        out.append(f"module share by instruction counts: access handler {cg['authentik']['access_handler_per_req']:,.0f} "
                   f"instructions/request inclusive, {cg['authentik']['access_handler_per_req'] / cg['authentik']['total_per_req'] * 100:.1f}% "
                   f"of the user-space instructions of an authenticated request")
    bp, ap = s.get(("baseline", "paced")), s.get(("authentik", "paced"))
    if bp and ap:
        d = ap["p99"] - bp["p99"]
        noisy = max(bp["foreign"], ap["foreign"])
        text = (f"p99 added latency under 100 µs at {res['paced']['target_rps']:,.0f} req/s: "
                f"{d:+.0f} µs (p99 {us(bp['p99'])} -> {us(ap['p99'])}; p50 {us(bp['p50'])} -> {us(ap['p50'])})")
        if noisy > NOISE_CORES:
            verdict["p99_added"] = None
            out.append(f"**INCONCLUSIVE** {text}: other processes used up to {noisy:.2f} cores during these runs")
        else:
            mark("p99_added", d < 100, text)
    sc = res.get("scale")
    if sc and len(sc["sizes"]) >= 2:
        lo, hi = sc["sizes"][0], sc["sizes"][-1]
        dr = hi["rps"] / lo["rps"]
        dc = hi["front_us_per_req"] - lo["front_us_per_req"]
        flat = dc <= 0.10 * lo["front_us_per_req"]
        noisy = max(r["foreign_cores"] for r in sc["sizes"])
        mark("flat_lookup", flat, f"flat lookup cost from {lo['sessions']:,} to {hi['sessions']:,} sessions "
             f"(front CPU per request within 10%): {lo['front_us_per_req']:.2f} -> {hi['front_us_per_req']:.2f} µs/req "
             f"({dc:+.2f}); req/s x{dr:.2f}, p99 {us(lo['p99'])} -> {us(hi['p99'])}"
             + (f" (req/s and p99 noisy: other load up to {noisy:.2f} cores)" if noisy > NOISE_CORES else ""))
    t = typical_session(res)
    if t and "zone_1m_gib" in t:
        mark("zone_1m", t["zone_1m_gib"] <= 2.0, f"1M typical sessions fit in at most 2 GiB: "
             f"{t['zone_1m_gib']:.2f} GiB ({t['bytes_per_session']:,.0f} bytes/session; "
             f"measured real session: {sc['calibration']['bytes_per_session']:,.0f} bytes)")
    elif t:
        mark("zone_1m", None, "1M typical sessions in at most 2 GiB: typical record size not determined")
    return out


# --- main ----------------------------------------------------------------------------------------------
def main():
    global MODULE, BENCH_MODULE
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("BENCH_SMOKE") == "1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    p = Params(args.smoke)
    out_md = Path(args.out) if args.out else (
        REPO / "build" / "bench-smoke" / "results.md" if p.smoke else BENCH / "results" / "latest.md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    harness.install_test_resolver()
    for f in (MODULE,):
        if not f.exists():
            sys.exit(f"bench: {f} missing: run `make module`")
    workdir = Path(tempfile.mkdtemp(prefix="nginx-authentik-bench-"))
    # Snapshot the modules: a concurrent `make module` rewrites build/*.so in place, which would
    # crash (SIGBUS) an nginx that has the file mapped.
    snap = {}
    for name, src in (("module", MODULE), ("bench-module", BENCH_MODULE)):
        if src.exists():
            dst = workdir / f"{name}.so"
            shutil.copy2(src, dst)
            snap[name] = {"file": str(src.relative_to(REPO)),
                          "mtime": datetime.datetime.fromtimestamp(src.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")}
            if name == "module":
                MODULE = dst
            else:
                BENCH_MODULE = dst
    bench = Bench(p, workdir)
    bench.res["modules"] = snap
    bench.res["facts"] = machine_facts()
    log(f"{'SMOKE ' if p.smoke else ''}run, work dir {workdir}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    ok = False
    try:
        bench.start_common()
        bench.throughput()
        bench.store_miss()
        bench.res["apache_error"] = bench.apache_error
        bench.callgrind()
        bench.scale()
        bench.logins()
        if not p.smoke and bench.res.get("scale"):
            log(f"typical session size: cargo test -p authentik-core {TYPICAL_TEST}")
            bench.res["typical_test"] = run_typical_test()
            log(f"  {bench.res['typical_test']['status']}")
        ok = True
    except KeyboardInterrupt:
        log("interrupted")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        bench.res["failed"].append(str(e))
        log(f"FAILED: {e}")
    finally:
        bench.stop_all()
    bench.res["apache_error"] = bench.apache_error
    bench.res["facts"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    bench.res["elapsed_s"] = time.monotonic() - t0
    md = render(bench.res)
    if bench.res["failed"]:
        md += "\n**THE RUN FAILED**: " + "; ".join(bench.res["failed"]) + "\n"
    out_md.write_text(md)
    out_md.with_suffix(".json").write_text(json.dumps(bench.res, indent=1, default=str))
    print()
    print(md)
    log(f"done in {bench.res['elapsed_s']:.0f} s; results in {out_md}")
    if not ok:
        log(f"work dir kept for inspection: {workdir}")
        sys.exit(1)
    if bench.apache_error and not p.smoke:
        log("set-up 4 (Apache) was not measured")
        sys.exit(3)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
