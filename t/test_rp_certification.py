"""OpenID Connect RP certification cases (Basic and Config RP profiles) run through nginx with
the module against a hostile provider of our own (hostile_provider.py), plus slow, hanging,
oversized and garbage provider answers.

A login: GET a protected URL as a browser -> 302 to the provider's authorize endpoint -> 302
to nginx's callback with code and state -> nginx redeems the code.
Success: the callback 302s back to the original URL with a session cookie; the upstream gets
X-authentik-username.  Refusal: an HTML error page (502, or a 4xx), no session cookie, the
upstream never reached (now or on the next request), exactly one [error]/[warn] line in the
error log naming the reason, no [crit]/[alert]/[emerg].

Every test runs one nginx worker (so the rotation test sees one worker's JWKS cache) with the
provider `timeout 2s;`.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from dataclasses import dataclass

import pytest
import requests

from harness import CALLBACK_PATH, OUTPOST, App, Browser, echo, parse_set_cookie, session_cookie_name, sub_for
from hostile_provider import HostileProvider, jwt_parts

TIMEOUT = 2  # the provider block's `timeout`, seconds
# a refused slow answer must come within the provider timeout + this
TIMEOUT_SLACK = 3.0
# status codes of a refused login (the module's choice between them is free)
REFUSED = (502, 400, 401, 403)

UPSTREAM_LOG_CONF = """
log_format rp_upstream '$upstream_addr $status "$request"';
access_log @PREFIX@/logs/upstream.log rp_upstream if=$upstream_addr;
"""

PROBLEM = re.compile(r"\[(warn|error)\]")
SEVERE = re.compile(r"\[(crit|alert|emerg)\]|exited on signal|worker process \d+ exited")


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def hostile():
    hp = HostileProvider().start()
    yield hp
    hp.stop()


@pytest.fixture
def rp(nginx, hostile, upstream):
    """nginx (1 worker) with the module, protecting the upstream, against the hostile provider.
    (nginx is set up before the provider, so the provider stops first at teardown and releases
    any connection it stalls.)"""
    app = App(nginx, hostile, upstream)
    app.start(worker_processes=1, provider_extra=f"timeout {TIMEOUT}s;", http_extra=UPSTREAM_LOG_CONF)
    app.hp = hostile
    return app


# --- helpers -----------------------------------------------------------------------------------
def upstream_hits(app, at_least: int = 0, wait: float = 0.2) -> list[str]:
    """Requests nginx proxied to the upstream (its access log of requests with $upstream_addr).
    nginx writes the log line after the response has gone out, so this waits up to `wait`
    seconds for `at_least` lines (for none: waits `wait` anyway, for a late line to show)."""
    p = app.nginx.prefix / "logs" / "upstream.log"
    deadline = time.monotonic() + wait
    while True:
        lines = p.read_text().splitlines() if p.exists() else []
        if (at_least and len(lines) >= at_least) or time.monotonic() >= deadline:
            return lines
        time.sleep(0.02)


@dataclass
class Attempt:
    url: str
    resp: requests.Response
    hops: list
    log: str  # what the error log got during the attempt
    took: float  # seconds nginx took on the callback (or on the first request if it ended there)
    reached_callback: bool

    def problems(self) -> list[str]:
        return [line for line in self.log.splitlines() if PROBLEM.search(line)]

    def severe(self) -> list[str]:
        return [line for line in self.log.splitlines() if SEVERE.search(line)]


def attempt_login(app, b: Browser, path: str = "/rp/page?x=1", timeout: float | None = None) -> Attempt:
    """Navigate to a protected URL and follow the login; the callback request is timed."""
    url = app.url(path)
    callback = app.url(CALLBACK_PATH)
    before = len(app.nginx.error_log())
    t0 = time.monotonic()
    r = b.get(url, stop=lambda resp: resp.headers.get("Location", "").startswith(callback))
    hops = list(b.hops)
    took = time.monotonic() - t0
    reached = r.status_code == 302 and r.headers.get("Location", "").startswith(callback)
    if reached:
        cb = urllib.parse.urljoin(r.url, r.headers["Location"])
        t0 = time.monotonic()
        try:
            r = b.get(cb, timeout=timeout)
        except requests.exceptions.Timeout:
            tokens = [{k: v for k, v in e.items() if k.startswith("trickle") or k == "time"}
                      for e in app.hp.hits("token")]
            pytest.fail(f"nginx did not answer the callback within {timeout or b.timeout}s "
                        f"(provider timeout {TIMEOUT}s); token endpoint: {tokens}; hops so far: {hops}")
        took = time.monotonic() - t0
        hops += b.hops
    return Attempt(url, r, hops, app.nginx.error_log()[before:], took, reached)


def session_cookies_set(app, hops) -> list:
    """Session cookies (name = the client's cookie, with a value) set along `hops`."""
    name = session_cookie_name(app.client["client_id"])
    out = []
    for h in hops:
        for raw in h.set_cookie:
            c = parse_set_cookie(raw)
            if c.name == name and c.value and c.attr("max-age") != "0":
                out.append(c)
    return out


def assert_logged_in(app, b: Browser, a: Attempt):
    hp = app.hp
    assert a.resp.status_code == 200, f"login failed: {a.resp.status_code} {a.resp.text[:300]}\n" \
                                      f"hops: {a.hops}\nerror.log: {a.log[-2000:]}"
    assert [h.status for h in a.hops] == [302, 302, 302, 200], a.hops
    assert a.hops[0].location.startswith(hp.url("authorize") + "?"), a.hops
    assert a.hops[2].url.startswith(app.url(CALLBACK_PATH)), a.hops
    assert urllib.parse.urljoin(a.hops[2].url, a.hops[2].location) == a.url, a.hops
    assert len(session_cookies_set(app, [a.hops[2]])) == 1, a.hops[2].set_cookie
    e = echo(a.resp)
    assert e.get("X-authentik-username") == "alice"
    assert e.get("X-authentik-uid") == sub_for("alice")
    assert not a.problems() and not a.severe(), a.log
    # the session is used on the next request, no login
    e2 = echo(b.get(app.url("/rp/again"), follow=False))
    assert e2.get("X-authentik-username") == "alice"
    assert len(upstream_hits(app, at_least=2, wait=2.0)) >= 2


def assert_refused(app, b: Browser, a: Attempt, reason: str, at: str = "callback", statuses=REFUSED):
    """The login was refused cleanly at `at` ("callback" or "discovery")."""
    hp = app.hp
    r = a.resp
    assert r.status_code in statuses, \
        f"expected a refusal ({statuses}) at the {at}, got {r.status_code}: {r.text[:300]}\n" \
        f"hops: {a.hops}\nerror.log: {a.log[-2000:]}"
    if at == "callback":
        assert a.reached_callback and len(a.hops) == 3, a.hops
        assert a.hops[0].location.startswith(hp.url("authorize") + "?"), a.hops
        assert a.hops[2].url.startswith(app.url(CALLBACK_PATH)), a.hops
        assert hp.hits("token"), "the module never called the token endpoint"
    else:
        assert len(a.hops) == 1 and a.hops[0].url == a.url, a.hops
        assert hp.hits("discovery") and not hp.hits("authorize"), hp.log
    assert "text/html" in r.headers.get("Content-Type", ""), r.headers
    assert r.text.strip(), "empty error page"
    # no session
    assert not session_cookies_set(app, a.hops), [h.set_cookie for h in a.hops]
    assert b.cookie(session_cookie_name(app.client["client_id"])) is None, b.cookies
    assert upstream_hits(app, wait=0) == [], upstream_hits(app)
    # exactly one log line, naming the reason
    problems = a.problems()
    assert len(problems) == 1, f"expected exactly one [error]/[warn] line, got {len(problems)}:\n{a.log}"
    assert re.search(reason, problems[0], re.IGNORECASE), f"log line does not name /{reason}/: {problems[0]}"
    if at == "callback":
        assert CALLBACK_PATH in problems[0], problems[0]
    assert not a.severe(), a.log
    # and the next request to the protected URL still does not reach the upstream
    r2 = b.get(a.url, follow=False)
    if at == "callback":
        assert r2.status_code == 302 and r2.headers["Location"].startswith(hp.url("authorize") + "?"), \
            (r2.status_code, r2.headers, r2.text[:300])
    else:
        assert r2.status_code == 502, (r2.status_code, r2.text[:300])
    assert upstream_hits(app) == [], upstream_hits(app)


def assert_worker_alive(app, workers_before: set):
    assert workers_before, "no nginx worker before the test"
    assert app.nginx.workers() == workers_before, "the nginx worker was replaced (crashed?)"
    r = Browser().get(app.url(f"{OUTPOST}/ping"), follow=False)
    assert r.status_code == 204, r.status_code


# --- Basic profile: what must work ----------------------------------------------------------
def test_rp_code_flow_rs256(rp):
    """rp-response_type-code, rp-id_token-sig-rs256, rp-token_endpoint-client_secret_basic,
    rp-userinfo-bearer-header, rp-scope-userinfo-claims, rp-discovery-openid-configuration,
    rp-discovery-jwks_uri-keys: the plain code flow against a well-behaved provider."""
    b = Browser()
    a = attempt_login(rp, b)
    assert_logged_in(rp, b, a)
    hp = rp.hp
    auth = hp.hits("authorize")
    assert len(auth) == 1
    q = auth[0]["query"]
    assert q["response_type"] == "code"
    assert "openid" in q["scope"].split()
    assert q["client_id"] == rp.client["client_id"]
    assert q["state"] and q["nonce"]
    assert q["code_challenge_method"] == "S256"
    # the nonce went into the id_token and the token request authenticated with HTTP Basic
    assert jwt_parts(hp.issued[0]["id_token"])[1]["nonce"] == q["nonce"]
    tok = hp.hits("token")
    assert [t["auth_method"] for t in tok] == ["client_secret_basic"], tok
    assert "client_secret" not in tok[0]["form"]
    assert tok[0]["form"]["redirect_uri"] == q["redirect_uri"]
    # keys from jwks_uri; userinfo with the access token as Bearer header, its claims forwarded
    assert hp.hits("jwks"), "the RS256 id_token was accepted without fetching the JWKS"
    ui = hp.hits("userinfo")
    assert len(ui) == 1 and ui[0]["headers"]["authorization"].startswith("Bearer "), ui
    assert "access_token" not in ui[0]["query"]
    e = echo(b.get(rp.url("/rp/claims"), follow=False))
    assert e.get("X-authentik-email") == "alice@example.test"  # only userinfo has it
    assert e.get("X-authentik-name") == "Alice Liddell"
    assert e.get("X-authentik-groups") == "admins|users"


def test_rp_id_token_sig_hs256(rp):
    """rp-id_token-sig-hs256: an HS256 id_token keyed with the client secret is accepted."""
    rp.hp.misbehave("hs256")
    b = Browser()
    assert_logged_in(rp, b, attempt_login(rp, b))
    assert jwt_parts(rp.hp.issued[0]["id_token"])[0]["alg"] == "HS256"


def test_rp_id_token_kid_absent_single_jwks(rp):
    """rp-id_token-kid-absent-single-jwks: no `kid` in the header, one key in the JWKS: use it."""
    rp.hp.misbehave("no-kid")
    b = Browser()
    assert_logged_in(rp, b, attempt_login(rp, b))
    assert "kid" not in jwt_parts(rp.hp.issued[0]["id_token"])[0]


def test_rp_id_token_kid_absent_multiple_jwks(rp):
    """rp-id_token-kid-absent-multiple-jwks: no `kid`, two keys published.  The profile lets the
    RP either find the key or reject the token; the module rejects it (it does not try keys),
    and whichever it does must be clean."""
    rp.hp.misbehave("no-kid", "extra-jwks-key")
    b = Browser()
    a = attempt_login(rp, b)
    if a.resp.status_code == 200:
        assert_logged_in(rp, b, a)
    else:
        assert_refused(rp, b, a, r"key|kid")


# --- Basic profile: what must be refused ----------------------------------------------------------
REFUSALS = [
    # fault, reason the error log must name; id = the RP test
    pytest.param("no-iat", r"\biat\b", id="rp-id_token-iat"),
    pytest.param("wrong-iss", r"issuer", id="rp-id_token-issuer-mismatch"),
    pytest.param("aud-untrusted", r"aud|azp", id="rp-id_token-aud"),
    pytest.param("wrong-aud", r"aud", id="rp-id_token-aud-single-other"),
    pytest.param("no-sub", r"\bsub\b", id="rp-id_token-sub"),
    pytest.param("bad-nonce", r"nonce", id="rp-nonce-invalid"),
    pytest.param("alg-none", r"\bnone\b", id="rp-id_token-sig-none"),
    pytest.param("bad-sig-rs256", r"signature", id="rp-id_token-bad-sig-rs256"),
    pytest.param("bad-sig-hs256", r"signature", id="rp-id_token-bad-sig-hs256"),
    pytest.param("expired", r"expired|\bexp\b", id="id_token-expired"),
    pytest.param("userinfo-bad-sub", r"userinfo.*\bsub\b|\bsub\b.*userinfo", id="rp-userinfo-bad-sub-claim"),
]


@pytest.mark.parametrize("fault,reason", REFUSALS)
def test_rp_refused(rp, fault, reason):
    rp.hp.misbehave(fault)
    b = Browser()
    a = attempt_login(rp, b)
    assert_refused(rp, b, a, reason)
    if fault == "userinfo-bad-sub":
        assert rp.hp.hits("userinfo"), "userinfo was never fetched"


# --- Config profile --------------------------------------------------------------------------------
def test_rp_discovery_issuer_not_matching_config(rp):
    """rp-discovery-issuer-not-matching-config: discovery's `issuer` is not the configured
    issuer: nothing from that document is used, the login does not start."""
    rp.hp.misbehave("discovery-wrong-issuer")
    b = Browser()
    a = attempt_login(rp, b)
    assert_refused(rp, b, a, r"issuer", at="discovery", statuses=(502,))


@pytest.mark.parametrize("keep_old", [True, False], ids=["jwks-A+B", "jwks-B"])
def test_rp_key_rotation_op_sign_key(rp, keep_old):
    """rp-key-rotation-op-sign-key: after a login with key A, the provider signs with a new key
    B (published with A, or alone).  The next login must succeed at once: an unknown kid makes
    the module refetch the JWKS (not only after its 30 s refetch interval)."""
    hp = rp.hp
    b1 = Browser()
    assert_logged_in(rp, b1, attempt_login(rp, b1, "/rp/first"))
    assert jwt_parts(hp.issued[-1]["id_token"])[0]["kid"] == "key-A"
    jwks_fetches = len(hp.hits("jwks"))
    assert jwks_fetches >= 1
    hp.rotate_key("key-B", keep_old=keep_old)
    b2 = Browser()
    a = attempt_login(rp, b2, "/rp/second")
    assert jwt_parts(hp.issued[-1]["id_token"])[0]["kid"] == "key-B"
    assert_logged_in(rp, b2, a)
    assert len(hp.hits("jwks")) > jwks_fetches, "logged in with key B without refetching the JWKS?"
    # the first session is unaffected
    assert echo(b1.get(rp.url("/rp/first-again"), follow=False)).get("X-authentik-username") == "alice"


# --- slow, hanging, oversized, garbage answers --------------------------------------------------
@pytest.mark.parametrize("fault", ["token-trickle-headers", "token-trickle-body", "token-trickle-deadline"],
                         ids=["headers", "body", "deadline"])
def test_token_endpoint_trickle(rp, fault):
    """A token endpoint answering one byte every 0.5 s (status line included, or after the
    headers; away from whole seconds), or that plus bytes back to back around the moment the
    `timeout` expires: the callback answers 502 within the timeout (+ slack), not when the
    answer is complete.  The "deadline" variant catches a client that bounds only each read
    (ureq 3.2's "global" timeout becomes a 1 s per-read timeout once a read returns past the
    deadline, so a byte every 0.5 s keeps it reading)."""
    rp.hp.client_timeout = TIMEOUT
    rp.hp.misbehave(fault)
    b = Browser()
    a = attempt_login(rp, b, timeout=TIMEOUT + TIMEOUT_SLACK + 3)
    assert a.took < TIMEOUT + TIMEOUT_SLACK, f"callback took {a.took:.1f}s with `timeout {TIMEOUT}s`"
    assert_refused(rp, b, a, r"time|unreachable", statuses=(502,))


def test_token_endpoint_never_answers(rp):
    rp.hp.misbehave("token-hang")
    b = Browser()
    a = attempt_login(rp, b, timeout=TIMEOUT + TIMEOUT_SLACK + 3)
    assert a.took < TIMEOUT + TIMEOUT_SLACK, f"callback took {a.took:.1f}s with `timeout {TIMEOUT}s`"
    assert a.took >= TIMEOUT - 0.5, f"gave up after {a.took:.1f}s, before the {TIMEOUT}s timeout"
    assert_refused(rp, b, a, r"time|unreachable", statuses=(502,))


@pytest.mark.parametrize("what", ["discovery", "jwks", "token"])
def test_oversized_answer(rp, what):
    """A 2 MB discovery / JWKS / token body (valid JSON, just too big) is refused with 502; the
    worker survives."""
    workers = rp.nginx.workers()
    rp.hp.misbehave(f"big-{what}")
    b = Browser()
    a = attempt_login(rp, b)
    at = "discovery" if what == "discovery" else "callback"
    assert_refused(rp, b, a, r"larger|too (big|large)|limit|size", at=at, statuses=(502,))
    if what == "jwks":
        assert rp.hp.hits("jwks")
    assert_worker_alive(rp, workers)


def test_garbage_discovery(rp):
    """Discovery answering 200 application/json that is not JSON: 502, login not started."""
    workers = rp.nginx.workers()
    rp.hp.misbehave("garbage-discovery")
    b = Browser()
    a = attempt_login(rp, b)
    assert_refused(rp, b, a, r"JSON|discovery|invalid", at="discovery", statuses=(502,))
    assert_worker_alive(rp, workers)
    # once the provider behaves, the login works again (the garbage was not kept as a
    # document; a failed fetch may be the answer for a few seconds, FETCH_RETRY_AFTER = 5 s)
    rp.hp.misbehave()
    deadline = time.monotonic() + 10
    while True:
        r = b.get(rp.url("/rp/later"), follow=False)
        if r.status_code == 302 or time.monotonic() > deadline:
            break
        assert r.status_code == 502, (r.status_code, r.text[:300])
        time.sleep(0.5)
    assert r.status_code == 302 and r.headers["Location"].startswith(rp.hp.url("authorize") + "?"), \
        f"login still refused 10 s after the provider recovered: {r.status_code}"
    assert_logged_in(rp, b, attempt_login(rp, b, "/rp/later"))
