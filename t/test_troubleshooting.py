"""The README's Troubleshooting section against the code's own messages, so it cannot go stale.

Every message the module can write (error_log lines, `nginx -t` errors, the "while ..." part of
its lines, the titles and texts of its error pages) is a string literal in src/ or core/src. This
test reads every literal of the non-test Rust code that reads like a message (a space and at least
one word of three letters; format placeholders such as `{e}` or `{}` count as `…`), and checks
both ways:

  * each such literal is found (as a substring) in a code span of the first column of a table in
    README.md's "Troubleshooting" section, unless it is listed in NOT_MESSAGES with a reason;
  * each code span in that first column contains one of those literals; in the table of nginx's
    own messages (heading "nginx's own messages"), each span is found in the nginx binaries
    instead (its pieces around `…`). Tables under a "Symptoms" heading (no message) are skipped.

No nginx is started: this runs in a fraction of a second.
"""

import re

import pytest

from harness import REPO, TARGETS

SOURCES = [REPO / "src", REPO / "core" / "src"]
README = REPO / "README.md"

# Literals that read like messages but are not: what they are instead.
NOT_MESSAGES = {
    "the OS random number generator works": "an expect() text: the module cannot run without it",
    "record field shorter than 4 GiB": "an expect() text on an impossible case",
    "authentik main conf": "an expect() text: nginx always gives the module its main conf",
    '… realm="…"': "the WWW-Authenticate headers of a 401",
    "Basic(…, ..)": "the Debug form of header credentials (never a secret)",
    "nginx-authentik header auth": "the domain separator of the header-auth cache key",
    "goauthentik.io/outpost/… (…)": "the User-Agent of calls to authentik",
    'authentik outpost "…"': "where an outpost provider comes from (no message uses it yet)",
    "Bearer …": "the Authorization header of the userinfo call",
    "Basic …": "the Authorization header of the token call",
    '<p><a href="…">…</a></p>': "the page template's link (core/src/page.rs)",
    "text/html; charset=utf-8": "the Content-Type of the module's pages",
    "text/plain; charset=utf-8": "the Content-Type of the forward-auth answers",
    "Log in again": "the link on the module's pages",
    "<!DOCTYPE html>": "the page template (core/src/page.rs)",
    "inserted …": "the answer of the bench-only fill endpoint",
    '# HELP … …': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    '# TYPE … …': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    "1 while the outpost's websocket to authentik is connected.": "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Bytes of the session zone in use (pages; pending-login slots are reserved).': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Duration of calls to the provider, by endpoint (failed calls included).': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Free bytes of the session zone (pages).': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Generation of the outpost configuration in use.': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Logins completed: sessions created.': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Logins started and not yet completed or expired, in the session zone.': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    "Logins started: redirects to the provider's authorization endpoint.": "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Logins that ended with an error page, by reason.': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Requests to protected locations, by provider and outcome.': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Sessions evicted, least recently used first, to make room for new ones.': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    'Sessions in the session zone (expired ones not yet collected included).': "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    "Unix time of the last successful sync with authentik's outpost API.": "a metric's HELP/TYPE text (authentik_metrics), not a log line",
    "text/plain; version=0.0.4; charset=utf-8": "the Content-Type of authentik_metrics",
    "Sign out": "the link on the rule's 403 page",
    "this account": "a word of the rule's 403 page",
    "claim …": "how a claim rule prints itself inside the 403 line",
    'error: "': "a key searched for in the redis crate's TLS panic text",
    'reason: "': "a key searched for in the redis crate's TLS panic text",
    "sid …": "a revocation message on the store's pub/sub channel",
    "sub …": "a revocation message on the store's pub/sub channel",
}


RAW_STR = re.compile(r'(?:b|c)?r(#*)"')
STR = re.compile(r'(?:b|c)?"')
CHAR = re.compile(r"'(\\.|\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|[^\\'])'")
LIFETIME = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9A-Za-z_.]*")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def tokens(src: str) -> list[tuple[str, str, int]]:
    """Rust source as (kind, value, line): "str" (the decoded literal), "char", "ident", "punct";
    comments and whitespace dropped."""
    i, n, line = 0, len(src), 1
    out = []
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
        elif m := RAW_STR.match(src, i):
            close = '"' + m.group(1)
            end = src.index(close, m.end())
            value = src[m.end():end]
            out.append(("str", value, line))
            line += value.count("\n")
            i = end + len(close)
        elif m := STR.match(src, i):
            j, buf, first = m.end(), [], line
            while src[j] != '"':
                if src[j] == "\\":
                    e = src[j + 1]
                    if e == "\n":  # line continuation: the newline and the next line's indent go
                        j += 1
                        while src[j] in " \t\n":
                            line += src[j] == "\n"
                            j += 1
                        continue
                    buf.append(ESCAPES.get(e, "\\" + e))
                    j += 2
                    continue
                line += src[j] == "\n"
                buf.append(src[j])
                j += 1
            out.append(("str", "".join(buf), first))
            i = j + 1
        elif c == "'" and (m := CHAR.match(src, i) or LIFETIME.match(src, i)):
            out.append(("char" if m.group(0).endswith("'") else "ident", m.group(0), line))
            i = m.end()
        elif m := WORD.match(src, i):
            out.append(("ident", m.group(0), line))
            i = m.end()
        else:
            out.append(("punct", c, line))
            i += 1
    return out


def strip_tests(toks: list) -> list:
    """Drops every item under #[cfg(test)] (a test module, function or use)."""
    out, i = [], 0
    while i < len(toks):
        if toks[i][1] == "#" and [t[1] for t in toks[i + 1:i + 7]] == ["[", "cfg", "(", "test", ")", "]"]:
            j, depth = i + 7, 0
            while j < len(toks):
                v = toks[j][1] if toks[j][0] == "punct" else None
                j += 1
                if v == "{":
                    depth += 1
                elif v == "}":
                    depth -= 1
                    if depth == 0:
                        break
                elif v == ";" and depth == 0:
                    break
            i = j
            continue
        out.append(toks[i])
        i += 1
    return out


def normalize(literal: str) -> str:
    """A format string as a user sees it: placeholders as `…`, braces unescaped, NULs dropped."""
    text = literal.replace("{{", "\x01").replace("}}", "\x02")
    text = re.sub(r"\{[^{}]*\}", "…", text)
    text = re.sub("…+", "…", text)  # `{url} answered {status}{detail}`: one value as far as a reader sees
    return text.replace("\x01", "{").replace("\x02", "}").replace("\0", "").strip()


def is_message(text: str) -> bool:
    return " " in text and re.search(r"[A-Za-z]{3,}", text) is not None


def code_messages() -> dict[str, str]:
    """normalized message -> where it is (file:line), over the non-test code."""
    found = {}
    for root in SOURCES:
        for f in sorted(root.rglob("*.rs")):
            if f.name.startswith("test_"):
                continue
            for kind, value, line in strip_tests(tokens(f.read_text())):
                if kind != "str":
                    continue
                text = normalize(value)
                if is_message(text):
                    found.setdefault(text, f"{f.relative_to(REPO)}:{line}")
    return found


def not_message(text: str) -> bool:
    return any(text == k or text.startswith(k) for k in NOT_MESSAGES)


def troubleshooting_tables() -> list[tuple[str, list[list[str]]]]:
    """(heading, [first-column code spans of each row]) for every table of the section."""
    text = README.read_text()
    m = re.search(r"^## Troubleshooting\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Troubleshooting' section"
    tables, heading, rows = [], "", None
    for line in m.group(1).splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            if rows is None:
                rows = []
                tables.append((heading, rows))
                continue  # the header row
            if re.fullmatch(r"\s*:?-+:?\s*", cells[0]):
                continue
            rows.append([s.replace("\\|", "|") for s in re.findall(r"`([^`]+)`", cells[0])])
        else:
            rows = None
    return tables


def nginx_binaries() -> list[bytes]:
    return [binary.read_bytes() for binary, _ in TARGETS.values() if binary.exists()]


def test_every_message_of_the_code_is_in_the_troubleshooting_table():
    spans = [s for _, rows in troubleshooting_tables() for row in rows for s in row]
    missing = {m: where for m, where in code_messages().items()
               if not not_message(m) and not any(m in s for s in spans)}
    assert not missing, ("messages missing from README.md's Troubleshooting tables (add a row, or "
                         "NOT_MESSAGES if it is not a message):\n"
                         + "\n".join(f"  {where}: {m}" for m, where in sorted(missing.items())))


def test_every_row_of_the_troubleshooting_table_is_a_message_of_the_code_or_of_nginx():
    messages = [m for m in code_messages() if not not_message(m)]
    binaries = nginx_binaries()
    assert binaries, "no nginx binary to check nginx's own messages against"
    stale = []
    rows_seen = 0
    for heading, rows in troubleshooting_tables():
        if "Symptoms" in heading:
            continue
        nginx_own = "nginx's own" in heading
        for row in rows:
            rows_seen += 1
            if not row:
                stale.append(f"{heading}: a row with no `message` in its first column")
            for span in row:
                if nginx_own:
                    pieces = [p.strip() for p in span.split("…") if p.strip()]
                    if not pieces or not all(any(p.encode() in b for b in binaries) for p in pieces):
                        stale.append(f"{heading}: {span} (not in the nginx binaries)")
                elif not any(m in span for m in messages):
                    stale.append(f"{heading}: {span}")
    assert rows_seen > 50, rows_seen
    assert not stale, "rows of README.md's Troubleshooting tables that no code writes:\n" + "\n".join(stale)


def test_not_messages_are_still_in_the_code():
    """NOT_MESSAGES cannot rot either."""
    found = code_messages()
    gone = [k for k in NOT_MESSAGES if not any(m == k or m.startswith(k) for m in found)]
    assert not gone, gone


@pytest.mark.parametrize("text,want", [
    ('"{}" directive is duplicate', '"…" directive is duplicate'),
    ("record of {0} bytes is larger than {1:?}", "record of … bytes is larger than …"),
    ("max_record={}k, {{literal}}", "max_record=…k, {literal}"),
])
def test_normalize(text, want):
    assert normalize(text) == want


def test_scanner_reads_rust_strings():
    src = ('fn a() { let x = "one \\\n      two"; let c = \'"\'; let r = r#"raw "q""#; }\n'
           '#[cfg(test)]\nmod tests { fn t() { let y = "in tests only"; } }\n'
           '// "a comment"\nfn b<\'a>() -> &\'a str { "after \\"quoted\\"" }\n')
    got = [v for k, v, _ in strip_tests(tokens(src)) if k == "str"]
    assert got == ["one two", 'raw "q"', 'after "quoted"'], got
