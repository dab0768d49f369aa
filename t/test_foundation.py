"""The module loads, its directives parse, bad configs fail `nginx -t` naming the
file and line, and nginx serves with 2 workers."""

import re
from pathlib import Path

import pytest

from harness import Browser, echo, provider_block

ISSUER = "http://127.0.0.1:9"  # never contacted by `nginx -t`
CLIENT = {"client_id": "test-client", "client_secret": "s3cr3t-s3cr3t-s3cr3t"}


def line_of(text: str, needle: str) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) == 1, f"{needle!r} found on lines {hits}"
    return hits[0]


def assert_emerg_at(nginx, rc, out, lines, what=""):
    """nginx -t failed with an [emerg] naming the test config file and one of `lines`.

    The [emerg] message may span several lines (e.g. a regex error with a caret) and
    may name more than one place (`... defined in conf:22: ... in conf:36`): it passes
    when any `<conf>:<line>` it names is one of `lines`."""
    conf = str(nginx.last_test_conf)
    assert rc != 0, f"nginx -t unexpectedly passed ({what}):\n{out}"
    m = re.search(r"\[emerg\](.*?)(?=^nginx: configuration file|\Z)", out, re.S | re.M)
    assert m, f"no [emerg] ({what}):\n{out}"
    msg = m.group(1)
    places = re.findall(re.escape(conf) + r":(\d+)", msg)
    assert places, f"[emerg] does not name {conf}:<line> ({what}):\n{out}"
    if isinstance(lines, int):
        lines = [lines]
    assert any(int(n) in lines for n in places), \
        f"[emerg] names lines {places}, expected one of {list(lines)} ({what}):\n{out}"


def base(provider_extra="", zone="authentik_session_zone zone=authentik:1m;", server="", client=CLIENT,
         secret_file=None, name="main"):
    return f"""
{zone}
{provider_block(name, ISSUER, client, "http://127.0.0.1:@PORT@", "proxy", provider_extra, secret_file=secret_file)}
server {{
    listen 127.0.0.1:@PORT@;
    {server}
    location / {{ auth_authentik main; return 200 "ok"; }}
}}
"""


def test_module_loads(nginx):
    nginx.check_target()
    rc, out = nginx.test_config(nginx.wrap("server { listen 127.0.0.1:@PORT@; location / { return 204; } }"))
    assert rc == 0, out
    assert "syntax is ok" in out and "test is successful" in out, out


def test_every_directive_parses(nginx, tmp_path):
    nginx.check_target()
    secret = tmp_path / "secret"
    secret.write_text("file-s3cr3t-file-s3cr3t\n")
    snippet = f"""
authentik_session_zone zone=authentik:2m timeout=24h;
authentik_session_zone zone=other:1m timeout=1h;
auth_authentik off;
authentik_provider main {{
    issuer        {ISSUER};
    client_id     test-client;
    client_secret s3cr3t-s3cr3t-s3cr3t;
    external_host http://127.0.0.1:@PORT@;
    mode          proxy;
    scopes        openid profile email entitlements ak_proxy;
    unauth_paths  ^/public/ ^/api/health$;
    session_zone  authentik;
    timeout       10s;
    post_logout_redirect http://127.0.0.1:@PORT@/bye;
}}
authentik_provider single {{
    issuer        {ISSUER}/application/o/single/;
    client_id     single-client;
    client_secret_file {secret};
    mode          forward_single;
    session_zone  other;
}}
authentik_provider domain {{
    issuer        {ISSUER};
    client_id     domain-client;
    client_secret s3cr3t;
    external_host http://auth.authentik.test:@PORT@;
    mode          forward_domain;
    cookie_domain authentik.test;
    session_zone  authentik;
}}
log_format authentik '$authentik_username $authentik_groups $authentik_entitlements $authentik_email '
                     '$authentik_name $authentik_uid $authentik_jwt $authentik_claim_email';
server {{
    listen 127.0.0.1:@PORT@;
    auth_authentik main;
    authentik_require group admins ops;
    authentik_unauth_paths ^/robots\\.txt$ ^/favicon\\.ico$;
    access_log {nginx.prefix}/logs/authentik.log authentik;
    location / {{
        proxy_pass http://127.0.0.1:9;
        proxy_set_header X-User $authentik_username;
        add_header X-Claim $authentik_claim_preferred_username;
    }}
    location /single {{
        auth_authentik single;
        authentik_unauth_paths ^/single/public/;
        return 200;
    }}
    location /open {{ auth_authentik off; return 200; }}
    location /admin {{
        authentik_require entitlement write;
        authentik_require claim email_verified true;
        return 200;
    }}
    location /team {{ authentik_require off; return 200; }}
    location = /metrics {{ authentik_metrics; allow 127.0.0.1; deny all; }}
}}
server {{
    listen 127.0.0.1:@PORT@;
    server_name *.authentik.test;
    location / {{ auth_authentik domain; return 200; }}
}}
"""
    rc, out = nginx.test_config(nginx.wrap(snippet))
    assert rc == 0, out


def test_misspelt_directive(nginx):
    nginx.check_target()
    text = nginx.wrap(base(server="auth_authentk main;  # typo"))
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "auth_authentk"), "misspelt")
    assert 'unknown directive "auth_authentk"' in out


def test_misplaced_provider_block(nginx):
    nginx.check_target()
    snippet = """
authentik_session_zone zone=authentik:1m;
server {
    listen 127.0.0.1:@PORT@;
    location / {
        authentik_provider inner {   # not allowed here
            issuer http://127.0.0.1:9;
            client_id x;
            client_secret y;
        }
    }
}
"""
    text = nginx.wrap(snippet)
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "authentik_provider inner"), "misplaced")
    assert "not allowed here" in out


def test_unknown_provider_name(nginx):
    nginx.check_target()
    text = nginx.wrap(base(server="location /x { auth_authentik nosuchprovider; }"))
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "nosuchprovider"), "unknown provider")


def test_missing_zone(nginx):
    nginx.check_target()
    # no authentik_session_zone at all
    text = nginx.wrap(base(zone=""))
    rc, out = nginx.test_config(text)
    start = line_of(text, "authentik_provider main {")
    end = start + text.splitlines()[start - 1:].index("}")
    assert_emerg_at(nginx, rc, out, range(start, end + 1), "no zone defined")


def test_unknown_session_zone(nginx):
    nginx.check_target()
    text = nginx.wrap(base(provider_extra="session_zone nosuchzone;"))
    rc, out = nginx.test_config(text)
    # the session_zone line, or the provider block naming it
    assert_emerg_at(nginx, rc, out, [line_of(text, "nosuchzone"), line_of(text, "authentik_provider main {")],
                    "unknown session_zone")
    assert "nosuchzone" in out


@pytest.mark.parametrize("where", ["provider", "server"])
def test_bad_regex(nginx, where):
    nginx.check_target()
    if where == "provider":
        text = nginx.wrap(base(provider_extra="unauth_paths ^/ok/ ^/(unclosed;"))
    else:
        text = nginx.wrap(base(server="authentik_unauth_paths ^/(unclosed;"))
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "(unclosed"), f"bad regex in {where}")


@pytest.mark.parametrize("issuer", ["not-a-url", "ftp://127.0.0.1:9/", "http://", "http://exa mple/"])
def test_bad_issuer_url(nginx, issuer):
    nginx.check_target()
    snippet = f"""
authentik_session_zone zone=authentik:1m;
authentik_provider main {{
    issuer {issuer!r};
    client_id x;
    client_secret y;
}}
server {{ listen 127.0.0.1:@PORT@; location / {{ auth_authentik main; return 200; }} }}
""".replace("'", '"')
    text = nginx.wrap(snippet)
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "    issuer "), f"issuer {issuer}")


def test_missing_client_id(nginx):
    nginx.check_target()
    snippet = """
authentik_session_zone zone=authentik:1m;
authentik_provider main {
    issuer http://127.0.0.1:9;
    client_secret y;
}
server { listen 127.0.0.1:@PORT@; location / { auth_authentik main; return 200; } }
"""
    text = nginx.wrap(snippet)
    rc, out = nginx.test_config(text)
    start = line_of(text, "authentik_provider main {")
    assert_emerg_at(nginx, rc, out, range(start, start + 4), "missing client_id")
    assert "client_id" in out


def test_unreadable_client_secret_file(nginx, tmp_path):
    nginx.check_target()
    missing = tmp_path / "no-such-secret"
    text = nginx.wrap(base(secret_file=str(missing)))
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "client_secret_file"), "unreadable secret file")


def test_bad_mode(nginx):
    nginx.check_target()
    text = nginx.wrap(base(provider_extra="").replace("mode proxy;", "mode sideways;"))
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, "mode sideways"), "bad mode")


def test_plain_location_two_workers(nginx, upstream):
    snippet = f"""
authentik_session_zone zone=authentik:1m;
{provider_block("main", ISSUER, CLIENT, None, "proxy")}
server {{
    listen 127.0.0.1:@PORT@;
    location / {{ auth_authentik off; proxy_pass {upstream.url}; }}
    location = /static {{ return 200 "static\\n"; }}
}}
"""
    nginx.start(snippet, worker_processes=2)
    assert len(nginx.workers()) == 2
    b = Browser()
    e = echo(b.get(nginx.url("/hello?x=1")))
    assert e.path == "/hello" and e.query == "x=1"
    assert not any(k.lower().startswith("x-authentik-") for k, _ in e.headers)
    r = b.get(nginx.url("/static"))
    assert r.status_code == 200 and r.text == "static\n"
    assert "[emerg]" not in nginx.error_log() and "[alert]" not in nginx.error_log()


@pytest.mark.parametrize("example", ["proxy.conf", "forward_single.conf", "forward_domain.conf"])
def test_example_configs_pass_nginx_t(nginx, example):
    """The README's examples in nginx-conf/ are valid as shipped (included inside http {})."""
    nginx.check_target()
    path = Path(__file__).resolve().parents[1] / "nginx-conf" / example
    assert path.is_file(), path
    rc, out = nginx.test_config(nginx.wrap(f"include {path};"))
    assert rc == 0, out
    assert "test is successful" in out, out
    # and a broken copy fails, naming the included file and line (the test can fail)
    broken = nginx.prefix / "conf" / f"broken-{example}"
    text = path.read_text().replace("auth_authentik ", "auth_authentk ", 1)
    broken.write_text(text)
    rc, out = nginx.test_config(nginx.wrap(f"include {broken};"))
    assert rc != 0 and f"{broken}:{line_of(text, 'auth_authentk ')}" in out, out


# The provider block is parsed through a command table like nginx's: argument counts,
# duplicates and unknown names fail `nginx -t` at the directive's own line.
@pytest.mark.parametrize("line,message", [
    ("issuer http://127.0.0.1:9/other/;", '"issuer" directive is duplicate'),
    ("client_id a b;", 'invalid number of arguments in "client_id" directive'),
    ("scopes;", 'invalid number of arguments in "scopes" directive'),
    ("frobnicate yes;", 'unknown directive "frobnicate"'),
    ("client_secret again;", '"client_secret" directive is duplicate'),
    ("timeout soon;", 'invalid timeout "soon"'),
    ("max_pending_calls 0;", 'invalid max_pending_calls "0"'),
    ("trusted_audiences;", 'invalid number of arguments in "trusted_audiences" directive'),
    ("login_timeout never;", 'invalid login_timeout "never"'),
])
def test_provider_block_command_table(nginx, line, message):
    nginx.check_target()
    text = nginx.wrap(base(provider_extra=line))
    rc, out = nginx.test_config(text)
    assert_emerg_at(nginx, rc, out, line_of(text, line), line)
    assert message in out, out
