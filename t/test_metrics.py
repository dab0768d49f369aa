"""authentik_metrics: the Prometheus text format, parsed by prometheus_client's parser, after a
scripted mix of requests on 2 workers; every counter is checked against what was sent."""

import threading
import time
import urllib.parse

import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import (CALLBACK_PATH, OUTPOST, XHR_HEADERS, App, Browser, access_pids, echo, free_port, fresh_get,
                     provider_block, session_cookie_name)
from hostile_provider import HostileProvider

OUTCOMES = ["session", "header_auth", "unauth_path", "login_redirect", "unauthorized", "forbidden"]
REASONS = ["invalid_state", "provider_denied", "provider_unavailable", "token_invalid", "session_too_large",
           "store_full", "busy", "bad_request"]
ENDPOINTS = ["discovery", "jwks", "token", "userinfo"]


def start(app, zone_size="1m", worker_processes=2):
    app.client = app.client or app.new_client()
    main = provider_block("main", app.provider.issuer, app.client, app.nginx.origin)
    # a provider nobody answers for: every login fails to fetch discovery
    dead = provider_block("down", f"http://127.0.0.1:{free_port()}/", app.provider.new_client([app.nginx.origin]),
                          app.nginx.origin, extra="timeout 2s;")
    up = app.upstream.url
    app.nginx.start(f"""
authentik_session_zone zone=authentik:{zone_size};
{main}
{dead}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik main; authentik_unauth_paths ^/public/; proxy_pass {up}; }}
    location /admin {{ auth_authentik main; authentik_require group admins; proxy_pass {up}; }}
    location /down {{ auth_authentik down; proxy_pass {up}; }}
    location /go {{ auth_authentik main; try_files /nonexistent @inner; }}
    location @inner {{ auth_authentik main; proxy_pass {up}; }}
    location = /metrics {{ authentik_metrics; allow 127.0.0.1; deny all; }}
}}
""", worker_processes=worker_processes)


def scrape(app) -> tuple[dict, dict]:
    """(samples by (name, sorted labels), family types by name), through the real parser."""
    r = requests.get(app.url("/metrics"), timeout=10)
    assert r.status_code == 200, r.status_code
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples, types = {}, {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples, types


def value(samples, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {key}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def requests_by_outcome(samples, provider):
    return {o: value(samples, "authentik_requests_total", provider=provider, outcome=o) for o in OUTCOMES}


def failures(samples, provider):
    return {r: value(samples, "authentik_logins_failed_total", provider=provider, reason=r) for r in REASONS}


def calls(samples, provider, endpoint):
    return value(samples, "authentik_provider_call_duration_seconds_count", provider=provider, endpoint=endpoint)


def check_histogram(samples, provider, endpoint):
    """Buckets are cumulative, +Inf is the count, the sum is plausible."""
    buckets = sorted(
        ((float(dict(k[1])["le"]), v) for k, v in samples.items()
         if k[0] == "authentik_provider_call_duration_seconds_bucket"
         and dict(k[1]).get("provider") == provider and dict(k[1]).get("endpoint") == endpoint))
    assert len(buckets) == 12, buckets
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), buckets
    assert buckets[-1][0] == float("inf") and counts[-1] == calls(samples, provider, endpoint)
    total = value(samples, "authentik_provider_call_duration_seconds_sum", provider=provider, endpoint=endpoint)
    assert 0 <= total <= counts[-1] * 10, total
    return counts[-1]


def test_metrics_count_a_scripted_mix_of_requests(app):
    start(app)
    nginx = app.nginx
    samples, types = scrape(app)
    # before any request: every provider's series, all zero
    for provider in ("main", "down"):
        assert set(requests_by_outcome(samples, provider).values()) == {0}
        assert set(failures(samples, provider).values()) == {0}
        for endpoint in ENDPOINTS:
            assert check_histogram(samples, provider, endpoint) == 0
    assert types["authentik_requests"] == "counter"
    assert types["authentik_provider_call_duration_seconds"] == "histogram"
    assert types["authentik_zone_sessions"] == "gauge"
    assert value(samples, "authentik_zone_sessions", zone="authentik") == 0
    assert value(samples, "authentik_zone_pending_logins", zone="authentik") == 0
    assert value(samples, "authentik_zone_evictions_total", zone="authentik") == 0
    assert not [k for k in samples if k[0].startswith("authentik_outpost_")], "outpost gauges without an outpost"

    expected = dict.fromkeys(OUTCOMES, 0)
    failed = dict.fromkeys(REASONS, 0)
    started = completed = 0
    name = session_cookie_name(app.client["client_id"])

    # two logins (each: the redirect to the provider, then the session's first request)
    cookies = {}
    for user in ("alice", "bob"):
        b = Browser()
        r = b.login(app.url("/"), user)
        assert echo(r).get("X-authentik-username") == user
        cookies[user] = {name: b.cookie(name)}
        expected["login_redirect"] += 1
        expected["session"] += 1
        started += 1
        completed += 1
    # sessions, on new connections (both workers)
    for _ in range(10):
        assert fresh_get(app.url("/"), cookies=cookies["alice"]).status_code == 200
        expected["session"] += 1
    for _ in range(3):
        assert fresh_get(app.url("/admin"), cookies=cookies["alice"]).status_code == 200
        expected["session"] += 1
    # an internal redirect into another location of the provider: one request, counted once
    for _ in range(2):
        r = fresh_get(app.url("/go"), cookies=cookies["alice"])
        assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice"
        expected["session"] += 1
    for _ in range(4):
        assert fresh_get(app.url("/admin"), cookies=cookies["bob"]).status_code == 403
        expected["forbidden"] += 1
    for _ in range(5):
        assert fresh_get(app.url("/public/x")).status_code == 200
        expected["unauth_path"] += 1
    for _ in range(6):
        assert fresh_get(app.url("/"), headers=XHR_HEADERS).status_code == 401
        expected["unauthorized"] += 1
    # navigations that never come back: pending logins
    for _ in range(3):
        assert fresh_get(app.url("/")).status_code == 302
        expected["login_redirect"] += 1
        started += 1
    pending = 3
    # callbacks with a state nobody issued
    for _ in range(2):
        r = fresh_get(app.url(f"{OUTPOST}/callback?state=forged&code=x"))
        assert r.status_code == 400
        failed["invalid_state"] += 1
    # the provider answers with error=access_denied
    b = Browser()
    r = b.get(app.url("/"), follow=False)
    assert r.status_code == 302
    expected["login_redirect"] += 1
    started += 1
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["Location"]).query)["state"][0]
    r = b.get(app.url(f"{OUTPOST}/callback?state={state}&error=access_denied"), follow=False)
    assert r.status_code == 403
    failed["provider_denied"] += 1
    # a user whose session is over max_record
    b = Browser()
    r = b.login(app.url("/"), "dave")
    assert r.status_code == 502
    expected["login_redirect"] += 1
    started += 1
    failed["session_too_large"] += 1

    # the provider that is down
    for _ in range(2):
        assert fresh_get(app.url("/down")).status_code == 502

    samples, _ = scrape(app)
    assert requests_by_outcome(samples, "main") == expected
    assert value(samples, "authentik_logins_started_total", provider="main") == started
    assert value(samples, "authentik_logins_completed_total", provider="main") == completed
    assert failures(samples, "main") == failed
    # three codes redeemed (alice, bob, dave), each with its userinfo call
    assert check_histogram(samples, "main", "token") == 3
    assert check_histogram(samples, "main", "userinfo") == 3
    # discovery and keys are cached per worker: fetched once by each worker that needed them
    assert 1 <= check_histogram(samples, "main", "discovery") <= 2
    assert 1 <= check_histogram(samples, "main", "jwks") <= 2

    down = dict.fromkeys(OUTCOMES, 0)
    down["login_redirect"] = 2
    assert requests_by_outcome(samples, "down") == down
    assert failures(samples, "down") == {**dict.fromkeys(REASONS, 0), "provider_unavailable": 2}
    assert value(samples, "authentik_logins_started_total", provider="down") == 0
    # a failed fetch is the answer for 5 s per worker: one or two attempts, timed
    assert 1 <= check_histogram(samples, "down", "discovery") <= 2
    for endpoint in ("jwks", "token", "userinfo"):
        assert check_histogram(samples, "down", endpoint) == 0

    assert value(samples, "authentik_zone_sessions", zone="authentik") == 2
    assert value(samples, "authentik_zone_pending_logins", zone="authentik") == pending
    used = value(samples, "authentik_zone_used_bytes", zone="authentik")
    free = value(samples, "authentik_zone_free_bytes", zone="authentik")
    assert used > 0 and free > 0 and (used + free) % 4096 == 0 and used + free <= 1 << 20
    assert value(samples, "authentik_zone_evictions_total", zone="authentik") == 0
    # the counters are summed over both workers
    assert len(access_pids(nginx)) == 2, "the requests did not reach both workers"

    # counters live in shared memory: a reload keeps them
    nginx.reload()
    after, _ = scrape(app)
    assert requests_by_outcome(after, "main") == expected
    assert failures(after, "main") == failed
    assert check_histogram(after, "main", "token") == 3


def test_evictions_are_counted(app):
    app.client = app.new_client()
    start(app, zone_size="64k")
    name = session_cookie_name(app.client["client_id"])
    logins = 0
    while logins < 200:
        b = Browser()
        r = b.login(app.url("/"), "alice")
        assert r.status_code == 200 and b.cookie(name)
        logins += 1
        if "evicted" in app.nginx.error_log():
            break
    samples, _ = scrape(app)
    evicted = value(samples, "authentik_zone_evictions_total", zone="authentik")
    sessions = value(samples, "authentik_zone_sessions", zone="authentik")
    assert evicted > 0, f"no eviction after {logins} logins"
    assert sessions + evicted == logins, (sessions, evicted, logins)
    assert value(samples, "authentik_logins_completed_total", provider="main") == logins


def test_metrics_endpoint_methods_and_access(app):
    start(app)
    r = requests.post(app.url("/metrics"), data=b"x", timeout=10)
    assert r.status_code == 405
    r = requests.head(app.url("/metrics"), timeout=10)
    assert r.status_code == 200 and r.text == ""
    # allow/deny apply as for stub_status (127.0.0.1 is allowed here; deny all otherwise)
    samples, _ = scrape(app)
    assert value(samples, "authentik_logins_started_total", provider="main") == 0


def test_busy_logins_and_slow_calls(app):
    """max_pending_calls 1 and a stalled token endpoint: the second callback is `busy`, and the
    stalled call lands in the histogram's 5 s bucket, not below."""
    app.start(provider_extra="max_pending_calls 1;\ntimeout 10s;", worker_processes=1,
              server_extra="location = /metrics { authentik_metrics; }")
    callbacks = []
    for user in ("alice", "bob"):
        b = Browser()
        r = b.start_login(app.url(f"/{user}"))
        r = b.submit_login(r, user, stop=lambda r: CALLBACK_PATH in r.headers.get("Location", ""))
        callbacks.append((b, urllib.parse.urljoin(r.url, r.headers["Location"])))
    app.provider.stall_token(3000, count=1)
    first = {}

    def run_first():
        b, url = callbacks[0]
        first["resp"] = b.get(url, timeout=20)

    th = threading.Thread(target=run_first)
    th.start()
    time.sleep(0.8)
    b, url = callbacks[1]
    assert b.get(url, follow=False, timeout=10).status_code == 503
    th.join(20)
    assert echo(first["resp"]).get("X-authentik-username") == "alice"
    app.provider.reset()

    samples, _ = scrape(app)
    assert failures(samples, "main") == {**dict.fromkeys(REASONS, 0), "busy": 1}
    assert value(samples, "authentik_logins_started_total", provider="main") == 2
    assert value(samples, "authentik_logins_completed_total", provider="main") == 1
    assert check_histogram(samples, "main", "token") == 1
    bucket = "authentik_provider_call_duration_seconds_bucket"
    assert value(samples, bucket, provider="main", endpoint="token", le="2.5") == 0
    assert value(samples, bucket, provider="main", endpoint="token", le="5") == 1
    total = value(samples, "authentik_provider_call_duration_seconds_sum", provider="main", endpoint="token")
    assert 3.0 <= total < 5.0, total


def test_invalid_tokens_are_counted(nginx, upstream):
    """Against a provider that signs with the wrong key or sends an expired id_token: logins
    failed with `token_invalid`, each after one timed token call; a valid login completes."""
    hp = HostileProvider().start()
    try:
        app = App(nginx, hp, upstream)
        app.start(worker_processes=1, provider_extra="timeout 2s;",
                  server_extra="location = /metrics { authentik_metrics; }")
        for fault in ("bad-sig-rs256", "expired"):
            hp.misbehave(fault)
            r = Browser().get(app.url("/x"))
            assert r.status_code == 502, (fault, r.status_code)
        hp.reset()
        r = Browser().get(app.url("/x"))
        assert r.status_code == 200 and echo(r).get("X-authentik-username") == "alice"
        samples, _ = scrape(app)
        assert failures(samples, "main") == {**dict.fromkeys(REASONS, 0), "token_invalid": 2}
        assert value(samples, "authentik_logins_started_total", provider="main") == 3
        assert value(samples, "authentik_logins_completed_total", provider="main") == 1
        assert check_histogram(samples, "main", "token") == 3
        assert check_histogram(samples, "main", "discovery") == 1
        assert requests_by_outcome(samples, "main") == {**dict.fromkeys(OUTCOMES, 0), "login_redirect": 3,
                                                        "session": 1}
    finally:
        hp.stop()
