"""Processes for `make bench`: nginx instances, Apache httpd, wrk, CPU accounting.

Everything listens on 127.0.0.1 and is stopped by process group (t/harness.kill_group).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

from harness import children_of, free_port, kill_group, process_title, wait_port

NGINX = Path("/usr/sbin/nginx")
APACHE = Path("/usr/sbin/apache2")
APACHE_MODULES = Path("/usr/lib/apache2/modules")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- CPU accounting ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    rest = stat[stat.rfind(")") + 2:].split()
    # fields 14 and 15 (1-based) of /proc/pid/stat; `rest` starts at field 3
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def cpu_of(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def set_affinity(pids, cpus) -> None:
    """Pins every thread of each process to `cpus` (None: all CPUs)."""
    cpus = set(cpus) if cpus is not None else set(range(os.cpu_count()))
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


# --- nginx ----------------------------------------------------------------------------------------
class NginxProc:
    """One nginx (master + workers, or a single process under valgrind) with its own prefix."""

    def __init__(self, name: str, workdir: Path, module: Path | None = None):
        self.name = name
        self.prefix = Path(workdir) / name
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        (self.prefix / "conf").mkdir(parents=True, exist_ok=True)
        self.module = module
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.master = True

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def conf(self, http: str, workers: int, master: bool) -> str:
        p = self.prefix
        lines = []
        if self.module:
            lines.append(f"load_module {self.module};")
        if os.geteuid() == 0:
            lines.append("user root;")
        lines += [
            f"worker_processes {workers};",
            "daemon off;",
            f"master_process {'on' if master else 'off'};",
            f"pid {p / 'logs' / 'nginx.pid'};",
            f"lock_file {p / 'logs' / 'nginx.lock'};",
            f"error_log {p / 'logs' / 'error.log'} warn;",
            "worker_rlimit_nofile 65536;",
            "events { worker_connections 4096; }",
            "http {",
            "    access_log off;",
            f"    client_body_temp_path {p / 'client_body_temp'};",
            f"    proxy_temp_path {p / 'proxy_temp'};",
            f"    fastcgi_temp_path {p / 'fastcgi_temp'};",
            f"    uwsgi_temp_path {p / 'uwsgi_temp'};",
            f"    scgi_temp_path {p / 'scgi_temp'};",
            "    default_type text/plain;",
            "    keepalive_requests 1000000;",
            "    keepalive_timeout 120s;",
            http.replace("@PORT@", str(self.port)),
            "}",
        ]
        return "\n".join(lines) + "\n"

    def start(self, http: str, workers: int = 1, master: bool = True, wrapper: list[str] | None = None,
              timeout: float = 15.0) -> "NginxProc":
        self.master = master
        conf_path = self.prefix / "conf" / "nginx.conf"
        conf_path.write_text(self.conf(http, workers, master))
        cmd = [str(NGINX), "-p", str(self.prefix) + "/", "-c", str(conf_path),
               "-e", str(self.prefix / "logs" / "error.log")]
        out = open(self.prefix / "logs" / "stderr.log", "ab")
        self.proc = subprocess.Popen((wrapper or []) + cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        try:
            wait_port(self.port, timeout, self.proc, f"nginx {self.name}")
            if master:
                deadline = time.monotonic() + timeout
                while len(self.workers()) < workers:
                    if time.monotonic() > deadline:
                        raise TimeoutError("workers did not start")
                    time.sleep(0.05)
        except Exception as e:
            err = self.error_log()[-3000:]
            self.stop()
            raise RuntimeError(f"nginx {self.name} failed to start: {e}\n{err}") from e
        return self

    def workers(self) -> list[int]:
        if self.proc is None:
            return []
        if not self.master:
            return [self.proc.pid]
        return sorted(pid for pid in children_of(self.proc.pid) if "worker process" in process_title(pid))

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid] + self.workers()

    def error_log(self) -> str:
        try:
            return (self.prefix / "logs" / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        kill_group(self.proc, signal.SIGTERM, timeout=10)
        self.proc = None


# --- Apache httpd + mod_auth_openidc --------------------------------------------------------------
class ApacheProc:
    def __init__(self, workdir: Path):
        self.root = Path(workdir) / "apache"
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redirect_uri(self) -> str:
        return f"{self.origin}/redirect_uri"

    def conf(self, upstream_port: int, issuer: str, client: dict, processes: int) -> str:
        r = self.root
        mods = ["mpm_event", "authn_core", "authz_core", "authz_user", "proxy", "proxy_http",
                "auth_openidc"]
        load = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in mods)
        user = "User www-data\nGroup www-data" if os.geteuid() == 0 else ""
        return f"""ServerRoot {r}
ServerName 127.0.0.1
Listen 127.0.0.1:{self.port}
PidFile {r / 'run' / 'apache.pid'}
DefaultRuntimeDir {r / 'run'}
Mutex file:{r / 'run'} default
ErrorLog {r / 'logs' / 'error.log'}
LogLevel warn
{load}
{user}
# mpm_event: {processes} process(es) x 128 threads (one process per front worker of the nginx set-ups)
StartServers {processes}
ServerLimit {processes}
ThreadsPerChild 128
ThreadLimit 128
MaxRequestWorkers {128 * processes}
MinSpareThreads 1
MaxSpareThreads {128 * processes}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 120

OIDCProviderMetadataURL {issuer.rstrip('/')}/.well-known/openid-configuration
OIDCClientID {client['client_id']}
OIDCClientSecret {client['client_secret']}
OIDCRedirectURI {self.redirect_uri}
OIDCCryptoPassphrase bench-{os.urandom(8).hex()}
OIDCScope "openid email profile entitlements"
OIDCPKCEMethod S256
OIDCProviderTokenEndpointAuth client_secret_basic
OIDCCacheType shm
OIDCSessionType server-cache
OIDCSessionInactivityTimeout 3600
OIDCPassClaimsAs headers
OIDCRemoteUserClaim preferred_username

<Location />
    AuthType openid-connect
    Require valid-user
    ProxyPass http://127.0.0.1:{upstream_port}/
</Location>
"""

    def start(self, upstream_port: int, issuer: str, client: dict, processes: int = 1,
              wrapper: list[str] | None = None, timeout: float = 15.0) -> "ApacheProc":
        conf = self.root / "httpd.conf"
        conf.write_text(self.conf(upstream_port, issuer, client, processes))
        out = open(self.root / "logs" / "stderr.log", "ab")
        self.proc = subprocess.Popen((wrapper or []) + [str(APACHE), "-f", str(conf), "-DFOREGROUND"],
                                     stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        try:
            wait_port(self.port, timeout, self.proc, "apache2")
            deadline = time.monotonic() + timeout
            while len(self.children()) < processes:
                if time.monotonic() > deadline:
                    raise TimeoutError("apache children did not start")
                time.sleep(0.05)
        except Exception as e:
            err = self.error_log()[-3000:]
            self.stop()
            raise RuntimeError(f"apache2 failed to start: {e}\n{err}") from e
        return self

    def children(self) -> list[int]:
        if self.proc is None:
            return []
        return sorted(children_of(self.proc.pid))

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid] + self.children()

    def workers(self) -> list[int]:
        return self.children()

    def error_log(self) -> str:
        try:
            return (self.root / "logs" / "error.log").read_text(errors="replace") + \
                (self.root / "logs" / "stderr.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        kill_group(self.proc, signal.SIGTERM, timeout=10)
        self.proc = None


# --- wrk ------------------------------------------------------------------------------------------
WRK_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%.2f,"p90":%.2f,"p99":%.2f,"p999":%.2f,"mean":%.2f,"max":%.2f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
"""


def wrk_script(workdir: Path, delay_ms: int | None = None) -> Path:
    """The wrk Lua script: a JSON summary line, and with `delay_ms` a random pause (mean
    `delay_ms`) before each request of every connection (fixed-rate mode: rate ~= connections /
    (delay + latency))."""
    name = f"wrk-delay{delay_ms}.lua" if delay_ms else "wrk.lua"
    path = Path(workdir) / name
    text = WRK_DONE_LUA
    if delay_ms:
        # a random pause with the given mean keeps the connections from marching in step
        text = f"delay = function() return math.random(1, {2 * int(delay_ms) - 1}) end\n" + text
    path.write_text(text)
    return path


def wrk(url: str, script: Path, duration: float, connections: int, threads: int = 1,
        headers: dict | None = None, cpus=None, timeout_s: int = 5) -> dict:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
           "--latency", "--timeout", f"{timeout_s}s", "-s", str(script)]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if cpus is not None:
        set_affinity([p.pid], cpus)
    out, err = p.communicate(timeout=duration + 60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {err}\n{out}")
    res = json.loads(m.group(1))
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["errors"] = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
    res["wrk_cpu"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return res
