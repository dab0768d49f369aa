"""What Dockerfile.build's second stage copies into the official nginx image, checked without Docker.

`make docker-image` runs packaging/docker-stage.sh on the vendored build (nginx 1.28.3 configured
--with-compat, like the official image's nginx) into build/docker. These tests lay the staged files
out the way the official image does (prefix /etc/nginx, modules/, conf.d/, load_module at the top
of nginx.conf), moved under a temporary directory, and run `nginx -t` with the vendored binary.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
STAGE = BUILD / "docker"
NGINX = BUILD / "vendored" / "sbin" / "nginx"
MODULE = "ngx_http_authentik_module.so"
LOAD_LINE = f"load_module modules/{MODULE};"
# The image's stock nginx.conf layout, as packaging/docker-stage.sh and Dockerfile.build assume it.
STOCK_CONF = ROOT / "packaging" / "docker" / "nginx.conf"
PROBE_CONF = """\
server {
    listen 127.0.0.1:9;
    server_name docker-stage-test.invalid;
    location / {
        auth_authentik off;
    }
}
"""


def run(*cmd, check=True):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {res.returncode}\n{res.stdout}{res.stderr}")
    return res


@pytest.fixture(scope="module")
def stage():
    if not (STAGE / "modules" / MODULE).exists() or not NGINX.exists():
        # Not under `make e2e` (which stages first): stage now.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        res = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "docker-image"], env=env,
                             capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"make docker-image failed\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    return STAGE


def bundled_nginx_version():
    lock = (ROOT / "Cargo.lock").read_text()
    m = re.search(r'name = "nginx-src"\nversion = "[^"+]*\+([0-9.]+)"', lock)
    assert m, "nginx-src not in Cargo.lock"
    return m.group(1)


def image_layout(tmp_path, conf_text):
    """An /etc/nginx like the official image's under tmp_path; returns the prefix."""
    prefix = tmp_path / "etc" / "nginx"
    (prefix / "modules").mkdir(parents=True)
    (prefix / "conf.d").mkdir()
    (tmp_path / "log").mkdir()
    shutil.copy(STAGE / "modules" / MODULE, prefix / "modules" / MODULE)
    (prefix / "mime.types").write_text("types {\n    text/html html;\n}\n")
    (prefix / "conf.d" / "authentik.conf").write_text(PROBE_CONF)
    text = (conf_text.replace("/etc/nginx/", f"{prefix}/")
            .replace("/var/log/nginx/", f"{tmp_path}/log/")
            .replace("/run/nginx.pid", f"{tmp_path}/nginx.pid"))
    # The image has a 'nginx' user; here, run as whoever we are.
    text = re.sub(r"(?m)^user\s+nginx;", "user root;" if os.geteuid() == 0 else "", text)
    (prefix / "nginx.conf").write_text(text)
    return prefix


def nginx_t(prefix):
    return run(NGINX, "-t", "-e", "stderr", "-p", f"{prefix}/", "-c", prefix / "nginx.conf", check=False)


def test_stage_contents_match_the_image(stage):
    for name in ("modules/" + MODULE, "load_module.conf", "nginx.conf", "enable-module.sh", "nginx-version"):
        assert (stage / name).is_file(), f"{name} missing from {stage}"
    assert (stage / "load_module.conf").read_text().strip() == LOAD_LINE
    assert (stage / "nginx.conf").read_text().splitlines()[0] == LOAD_LINE
    assert os.access(stage / "enable-module.sh", os.X_OK)

    # Same nginx version everywhere: staged for, vendored binary, nginx-src, Dockerfile's image tag.
    version = (stage / "nginx-version").read_text().strip()
    v = run(NGINX, "-V").stderr
    assert f"nginx/{version}\n" in v, v
    assert "--with-compat" in v, "the official image's nginx is --with-compat; the vendored build must be too"
    assert version == bundled_nginx_version()
    dockerfile = (ROOT / "Dockerfile.build").read_text()
    assert re.search(rf"(?m)^ARG NGINX_VERSION={re.escape(version)}$", dockerfile), \
        f"Dockerfile.build's NGINX_VERSION default is not {version}"
    assert "FROM nginx:${NGINX_VERSION}" in dockerfile


def test_enable_script_on_stock_conf_loads_module(stage, tmp_path):
    """What Dockerfile.build does: copy the .so, run enable-module.sh on the stock nginx.conf."""
    prefix = image_layout(tmp_path, STOCK_CONF.read_text())

    # Control: the stock conf does not load the module, so the directive is unknown.
    res = nginx_t(prefix)
    assert res.returncode != 0 and 'unknown directive "auth_authentik"' in res.stderr, res.stderr

    conf = prefix / "nginx.conf"
    run("sh", stage / "enable-module.sh", conf)
    run("sh", stage / "enable-module.sh", conf)  # idempotent
    lines = conf.read_text().splitlines()
    assert lines[0] == LOAD_LINE and lines.count(LOAD_LINE) == 1

    res = nginx_t(prefix)
    assert res.returncode == 0, res.stderr
    assert "test is successful" in res.stderr


def test_staged_nginx_conf_loads_module(stage, tmp_path):
    """The alternative: COPY the staged nginx.conf over the image's."""
    prefix = image_layout(tmp_path, (stage / "nginx.conf").read_text())
    res = nginx_t(prefix)
    assert res.returncode == 0, res.stderr
    assert "test is successful" in res.stderr
