#!/usr/bin/env bash
# Entry point of `make bench` (and, with BENCH_SMOKE=1, `make bench-smoke`, part of `make test`).
#   bench/run.sh                 full run (~15 min): writes bench/results/latest.{md,json}
#   BENCH_SMOKE=1 bench/run.sh   tiny durations, no Apache (BENCH_SMOKE_APACHE=1 adds it):
#                                checks every set-up still works; writes build/bench-smoke/results.md
# Needs build/ngx_http_authentik_module.so (make module) and, for the session-store scale part,
# build/bench/ngx_http_authentik_module.so (make bench-module; optional in smoke mode).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# Python venv, node provider, wrk, curl (idempotent, quiet when present)
.ci/deps.sh test

# the bench's own Debian packages
pkgs=(wrk valgrind)
if [ "${BENCH_SMOKE:-}" != 1 ] || [ "${BENCH_SMOKE_APACHE:-}" = 1 ]; then
    pkgs+=(apache2 libapache2-mod-auth-openidc)
fi
missing=()
for p in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bench: missing Debian packages ${missing[*]} (run as root or apt-get install them)" >&2
        exit 1
    fi
    echo "bench: installing ${missing[*]}"
    # keep Debian's apache2 service from starting (we run our own Apache in a temp dir)
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >/tmp/nginx-authentik-bench-apt.log 2>&1 </dev/null; then
        tail -n 10 /tmp/nginx-authentik-bench-apt.log >&2
        [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
        echo "bench: apt-get install ${missing[*]} failed" >&2
        exit 1
    fi
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

exec "$root/build/venv/bin/python" "$root/bench/bench.py" "$@"
