"""`make demo` as a new user meets it: t/demo.py started on free ports, a login with a real
browser (Debian's chromium driven through chromium-driver by selenium, headless), the identity
page, the WebSocket echo, sign-out, and a clean stop on SIGTERM, SIGINT and SIGHUP with no
process left behind; a port in use is one line before anything starts.

DEMO_SCREENSHOT=<path.png> saves the logged-in page there (README's docs/demo.png is made so).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import harness
from harness import TARGETS, USERS, children_of, free_port, process_title, session_cookie_name

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READY_LINE = "Ctrl-C to stop."
WAIT = 30  # seconds, any one browser wait


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for kid in children_of(todo.pop()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def get(url: str, **kw) -> requests.Response:
    """A plain GET from loopback: no proxy from the environment, no redirects followed."""
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, allow_redirects=False, timeout=15, **kw)


def port_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Demo:
    """t/demo.py as `make demo` runs it, on free ports, for one nginx target."""

    def __init__(self, target: str, workdir: Path, port: int | None = None, provider_port: int | None = None,
                 authentik: str | None = None):
        self.nginx_bin, self.module = TARGETS[target]
        self.authentik = authentik
        self.port = port or free_port()
        self.provider_port = provider_port or free_port()
        while self.provider_port == self.port:
            self.provider_port = free_port()
        self.workdir = workdir
        self.proc = None
        self.seen: set[int] = set()  # every process of the demo seen, for the teardown

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
        env.update(DEMO_NGINX=str(self.nginx_bin), DEMO_MODULE=str(self.module), DEMO_PORT=str(self.port),
                   DEMO_PROVIDER_PORT=str(self.provider_port))
        if self.authentik:
            env["DEMO_AUTHENTIK"] = self.authentik
        return env

    def run(self, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(harness.T_DIR / "demo.py")], env=self.env(), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 60, via_shell: bool = False) -> "Demo":
        """Starts the demo (as a child of a bash, like `make` runs it, with `via_shell`)."""
        for p in (self.nginx_bin, self.module):
            assert p.exists(), f"{p} is not built"
        self.out_path = self.workdir / "demo.out"
        self.err_path = self.workdir / "demo.err"
        cmd = [sys.executable, str(harness.T_DIR / "demo.py")]
        if via_shell:  # `; true`: bash stays the parent instead of exec'ing the demo
            cmd = ["bash", "-c", f'"{cmd[0]}" "{cmd[1]}"; true']
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            # its own session: a leftover can be found (and killed) by group after the test
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.out_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"demo did not start (exit {self.proc.poll()}):\n{self.output()}")
            time.sleep(0.1)
        self.processes()
        return self

    def output(self) -> str:
        return self.out_path.read_text() + "\n--- stderr ---\n" + self.err_path.read_text()

    def processes(self) -> set[int]:
        found = descendants(self.proc.pid)
        self.seen |= found
        return found

    def stop_with(self, sig: int, timeout: float = 30) -> set[int]:
        """Sends `sig` to the demo's own process (not its group, as `kill` or `timeout` would),
        waits for it to exit 0; returns the processes it had started, to check they are gone."""
        kids = self.processes()
        assert kids, "the demo had started no processes"
        os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"demo still running {timeout}s after {signal.Signals(sig).name}:\n{self.output()}")
        assert rc == 0, f"demo exited {rc} on {signal.Signals(sig).name}:\n{self.output()}"
        return kids

    def kill(self):
        """Teardown: whatever is left of the demo, even after its parent is gone."""
        if self.proc is None:
            return
        left = {pid for pid in self.seen | descendants(self.proc.pid) if alive(pid)}
        harness.kill_group(self.proc, signal.SIGKILL, timeout=5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def assert_all_gone(kids: set[int], demo: Demo, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {pid for pid in kids if alive(pid)}
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left behind: {[(pid, process_title(pid)) for pid in left]}"
    for port in (demo.port, demo.provider_port):
        assert not port_listening(port), f"port {port} still served after the demo stopped"


@pytest.fixture
def demo(target, tmp_path):
    made = []

    def make(**kw):
        d = Demo(target, tmp_path / f"demo{len(made)}", **kw)
        d.workdir.mkdir(parents=True, exist_ok=True)
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


# --- the real browser ---------------------------------------------------------------------
@pytest.fixture
def chromium(tmp_path):
    for p in (CHROMIUM, CHROMEDRIVER):
        assert p.exists(), f"{p} missing: install Debian's chromium and chromium-driver (.ci/deps.sh test)"
    # selenium must not look for (or download) a browser or driver of its own
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--disable-component-update", "--no-proxy-server", "--window-size=1100,1200",
                "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")  # chromium refuses to run as root with its sandbox
    log = tmp_path / "chromedriver.log"
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    try:
        driver = webdriver.Chrome(service=service, options=opts)
    except Exception as e:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"chromium did not start through chromedriver: {e}\n--- chromedriver.log ---\n{tail}")
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, what, cond, timeout=WAIT):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; at {driver.current_url}:\n{driver.page_source[:3000]}")


def element(driver, css, what=None, timeout=WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    return wait_for(driver, what or css, EC.presence_of_element_located((By.CSS_SELECTOR, css)), timeout)


def text_in(driver, css, text, timeout=WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait_for(driver, f"{text!r} in {css}", EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text), timeout)
    return driver.find_element(By.CSS_SELECTOR, css).text


def log_in(driver, url, user):
    driver.get(url)
    form = element(driver, "form#login", "the provider's login form")
    form.find_element("name", "username").send_keys(user)
    form.find_element("name", "password").send_keys(USERS[user])
    form.submit()
    element(driver, "#whoami", "the demo's identity page after login")


def test_demo_browser_login_identity_websocket_sign_out_and_sigterm(demo, chromium, tmp_path):
    d = demo().start()
    driver = chromium
    log_in(driver, d.origin + "/", "alice")
    assert driver.current_url == d.origin + "/", driver.current_url
    assert driver.title == "nginx-authentik demo: alice"

    # who you are: what the provider says about alice (t/provider/server.mjs)
    cell = lambda name: driver.find_element("id", name.lower()).text  # noqa: E731
    assert cell("X-authentik-username") == "alice"
    assert driver.find_element("id", "whoami").text == cell("X-authentik-name") != ""
    assert cell("X-authentik-email") == "alice@example.test"
    assert cell("X-authentik-groups").split() == ["admins", "users"]
    assert cell("X-authentik-entitlements").split() == ["app-read", "app-write"]
    others = driver.find_element("id", "headers").text
    for name in ("X-authentik-uid", "X-authentik-jwt", "X-authentik-meta-provider"):
        assert name.lower() in others.lower(), others
    assert harness.sub_for("alice") in others

    # the browser holds the session cookie; the app never saw it
    names = {c["name"] for c in driver.get_cookies()}
    assert session_cookie_name("nginx-demo") in names, names
    verdict = driver.find_element("id", "session-cookie")
    assert "never reached" in verdict.text and verdict.get_attribute("class") == "ok", verdict.text
    assert "authentik_proxy_" not in driver.find_element("id", "cookies").text

    # the protected WebSocket: upgraded through the same session, and echoing
    text_in(driver, "#ws-status", "connected")
    text_in(driver, "#ws-log", "server: hello alice")
    box = driver.find_element("id", "ws-input")
    box.clear()
    box.send_keys("ping through nginx")
    driver.find_element("id", "ws-send").click()
    text_in(driver, "#ws-log", "echo: ping through nginx")

    shot = tmp_path / "demo.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DEMO_SCREENSHOT"])

    # API clients still get JSON, with the browser's session
    jar = {c["name"]: c["value"] for c in driver.get_cookies()}
    r = get(d.origin + "/api/me", cookies=jar, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json"), r.text[:300]
    got = dict((k.lower(), v) for k, v in r.json()["headers"])
    assert got["x-authentik-username"] == "alice"
    assert not any(c.startswith("authentik_proxy_") for c in got.get("cookie", "").split("; ")), got
    # without a session: a 401 for an API client, never the app
    r = get(d.origin + "/api/me", headers={"Accept": "application/json"})
    assert r.status_code == 401 and "x-authentik-username" not in r.text.lower()

    # the unauthenticated path, linked from the page
    driver.find_element("id", "public").click()
    text_in(driver, "h1", "A page without login")
    assert driver.current_url == d.origin + "/public/"
    driver.back()
    element(driver, "#sign-out")

    # sign out: the provider's session ends too, so the next visit asks for a login again
    driver.find_element("id", "sign-out").click()
    element(driver, "form#login", "the login form after signing out")
    assert session_cookie_name("nginx-demo") not in {c["name"] for c in driver.get_cookies()}
    driver.get(d.origin + "/")
    element(driver, "form#login", "the login form for a signed-out browser")
    assert "/interaction/" in driver.current_url

    # the public page needs no login at all
    r = get(d.origin + "/public/", headers={"Accept": "text/html"})
    assert r.status_code == 200 and 'id="public-identity">X-authentik-username: (none)' in r.text

    kids = d.stop_with(signal.SIGTERM)
    assert_all_gone(kids, d)
    assert "SIGTERM, stopping" in d.err_path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_demo_stops_whole_on_signal(demo, sig):
    d = demo().start()
    kids = d.processes()
    titles = " ".join(process_title(pid) for pid in kids)
    assert "server.mjs" in titles and "demo_app.py" in titles and "nginx: worker process" in titles, titles
    r = get(d.origin + "/public/", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json()["path"] == "/public/"
    assert_all_gone(d.stop_with(sig), d)


def test_demo_as_outpost_of_the_authentik_emulator(demo):
    """`make demo AUTHENTIK=emulator`: nginx is the outpost of the authentik emulator; a login
    through it, the identity page's JSON, then a clean SIGTERM."""
    d = demo(authentik="emulator").start()
    titles = " ".join(process_title(pid) for pid in d.processes())
    assert "authentik_emulator.py" in titles and "server.mjs" not in titles, titles
    assert "authentik_outpost" in (Path(d.output().split("nginx config: ")[1].split()[0])).read_text()
    b = harness.Browser()
    r = b.login(d.origin + "/", "alice")
    assert r.status_code == 200, b.hops
    e = harness.echo(b.get(d.origin + "/", headers={"Accept": "application/json"}))
    names = {k.lower(): e.get(k) for k in ("X-authentik-username", "X-authentik-meta-outpost", "X-authentik-meta-app")}
    assert names.get("x-authentik-username") == "alice", names
    assert names.get("x-authentik-meta-outpost") == "nginx demo outpost"
    assert names.get("x-authentik-meta-app") == "demo"
    assert get(d.origin + "/public/", headers={"Accept": "application/json"}).status_code == 200
    assert_all_gone(d.stop_with(signal.SIGTERM), d)


def test_demo_stops_when_its_parent_is_killed(demo):
    """`kill -9` of `make` (or of the shell running the demo) stops the demo too."""
    d = demo().start(via_shell=True)
    kids = d.processes()
    assert any("demo.py" in process_title(pid) for pid in kids), kids
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(timeout=10)
    assert_all_gone(kids, d, timeout=30)
    assert "SIGTERM, stopping" in d.err_path.read_text()


@pytest.mark.parametrize("which", ["nginx", "provider"])
def test_demo_port_in_use_is_one_line(demo, which):
    """Before starting anything: one line naming the port and how to pick another."""
    d = demo()
    taken = d.port if which == "nginx" else d.provider_port
    other = d.provider_port if which == "nginx" else d.port
    env = "DEMO_PORT" if which == "nginx" else "DEMO_PROVIDER_PORT"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", taken))
        s.listen()
        r = d.run()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert re.fullmatch(rf"demo: port {taken} \(.+\) is in use; pick another: {env}=\d+ make demo", lines[0]), lines
    suggested = int(lines[0].rsplit("=", 1)[1].split()[0])
    assert suggested not in (taken, other)
    # nothing was started: no provider, no app, no nginx
    assert r.stdout == ""
    assert not port_listening(other)
