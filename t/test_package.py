"""The Debian package (make deb): install it into this machine's nginx, load it through Debian's
stock /etc/nginx/nginx.conf (which includes modules-enabled/), remove it, reinstall it, purge it.

It changes the system (dpkg, /etc/nginx), so it is one test function, which xdist never runs twice
at once, and it holds a lock file against other test runs; it puts the system back even when it
fails. Needs root.
"""

import contextlib
import fcntl
import os
import pathlib
import subprocess
import time
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
PKG = "libnginx-mod-http-authentik"
NGINX = "/usr/sbin/nginx"
SO = pathlib.Path("/usr/lib/nginx/modules/ngx_http_authentik_module.so")
AVAILABLE = pathlib.Path("/usr/share/nginx/modules-available/mod-http-authentik.conf")
ENABLED = pathlib.Path("/etc/nginx/modules-enabled/50-mod-http-authentik.conf")
PARKED = pathlib.Path(str(ENABLED) + ".removed")
DOC = pathlib.Path("/usr/share/doc") / PKG
LOAD_LINE = "load_module modules/ngx_http_authentik_module.so;"
# A server that uses the module's directive: nginx -t accepts it only if the module is loaded.
PROBE = pathlib.Path("/etc/nginx/conf.d/zz-nginx-authentik-package-test.conf")
PROBE_CONF = """\
# written by nginx-authentik's t/test_package.py; removed when it ends
server {
    listen 127.0.0.1:9;
    server_name nginx-authentik-package-test.invalid;
    location / {
        auth_authentik off;
    }
}
"""
LOCK = pathlib.Path("/run/lock/nginx-authentik-package-test.lock")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a Debian package and edits /etc/nginx: needs root"),
    pytest.mark.xdist_group("system-nginx"),
]


def run(*cmd, check=True, timeout=120):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def dpkg(*args, check=True):
    """dpkg, waiting a while if apt or another dpkg holds the lock."""
    for _ in range(60):
        res = run("dpkg", *args, check=False)
        if res.returncode == 0 or "lock" not in res.stderr:
            break
        time.sleep(2)
    if check and res.returncode != 0:
        raise AssertionError(f"dpkg {' '.join(args)} exited {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def status():
    """dpkg's two-letter state of the package ('ii', 'rc', ...), or None if dpkg does not know it."""
    res = run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", PKG, check=False)
    state = res.stdout.strip() if res.returncode == 0 else ""
    return None if state in ("", "un", "pn") else state


def nginx_t():
    return run(NGINX, "-t", check=False)


def locate_deb():
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    arch = run("dpkg", "--print-architecture").stdout.strip()
    deb = BUILD / f"{PKG}_{version}_{arch}.deb"
    so = BUILD / "ngx_http_authentik_module.so"
    if not deb.exists() or (so.exists() and so.stat().st_mtime > deb.stat().st_mtime):
        # Not under `make e2e` (which makes it first): build it.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        res = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "deb"], env=env,
                             capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"make deb failed\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    assert deb.exists(), f"make deb did not produce {deb}"
    return deb


def purge_leftovers():
    if status() is not None:
        dpkg("--purge", PKG)
    for link in (ENABLED, PARKED):
        if link.is_symlink():
            link.unlink()
    PROBE.unlink(missing_ok=True)


@contextlib.contextmanager
def system_lock():
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def assert_gone():
    assert status() is None, f"dpkg still knows {PKG}: {status()}"
    for path in (SO, AVAILABLE, DOC):
        assert not path.exists(), f"{path} left behind"
    for link in (ENABLED, PARKED):
        assert not link.is_symlink() and not link.exists(), f"{link} left behind"


def test_deb_install_load_remove_purge():
    deb = locate_deb()
    assert os.path.exists(NGINX), "Debian's nginx is not installed (.ci/deps.sh build installs it)"

    # The package's metadata.
    fields = {f: run("dpkg-deb", "-f", str(deb), f).stdout.strip()
              for f in ("Package", "Version", "Architecture", "Section", "Maintainer", "Depends", "Description")}
    assert fields["Package"] == PKG
    assert fields["Section"] == "httpd"
    assert fields["Maintainer"] and fields["Description"]
    provides = run("dpkg-query", "-W", "-f=${Provides}", "nginx").stdout
    abis = [p.strip().split()[0] for p in provides.split(",") if p.strip().startswith("nginx-abi-")]
    assert abis, f"installed nginx provides no nginx-abi-*: {provides!r}"
    depends = [d.strip().split()[0] for d in fields["Depends"].split(",")]
    assert abis[0] in depends, f"Depends {fields['Depends']!r} lacks {abis[0]}"
    assert "libc6" in depends
    contents = run("dpkg-deb", "-c", str(deb)).stdout
    for path in (SO, AVAILABLE):
        assert "." + str(path) in contents, f"{path} not in the package:\n{contents}"
    assert "/etc/nginx" not in contents, "the symlink must come from postinst, not the archive"

    with system_lock():
        try:
            purge_leftovers()

            # Without the package, Debian's nginx does not know the directive.
            PROBE.write_text(PROBE_CONF)
            res = nginx_t()
            assert res.returncode != 0 and 'unknown directive "auth_authentik"' in res.stderr, res.stderr

            # Install: files, the enabling symlink, and the module loaded through nginx.conf.
            dpkg("-i", str(deb))
            assert status() == "ii"
            assert SO.is_file() and SO.stat().st_size > 0
            assert AVAILABLE.read_text().strip() == LOAD_LINE
            assert ENABLED.is_symlink() and os.readlink(ENABLED) == str(AVAILABLE)
            res = nginx_t()
            assert res.returncode == 0, res.stderr
            assert "test is successful" in res.stderr
            dump = run(NGINX, "-T").stdout
            assert f"# configuration file {ENABLED}:\n{LOAD_LINE}" in dump

            # Remove (not purge): the link is parked, the module is gone, nginx -t rejects the probe.
            dpkg("-r", PKG)
            assert status() == "rc"
            assert not SO.exists()
            assert not ENABLED.is_symlink() and PARKED.is_symlink()
            assert nginx_t().returncode != 0

            # Reinstall after a remove: the parked link is restored.
            dpkg("-i", str(deb))
            assert ENABLED.is_symlink() and not PARKED.is_symlink()
            assert nginx_t().returncode == 0

            # An admin who disabled the module keeps it disabled across an upgrade/reinstall.
            ENABLED.unlink()
            dpkg("-i", str(deb))
            assert not ENABLED.is_symlink(), "postinst re-enabled a module the admin had disabled"
            assert nginx_t().returncode != 0

            # Purge: nothing left.
            dpkg("--purge", PKG)
            assert_gone()
            PROBE.unlink()
            res = nginx_t()
            assert res.returncode == 0, f"stock nginx config broken after purge:\n{res.stderr}"
        finally:
            purge_leftovers()
    assert_gone()
