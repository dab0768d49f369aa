#!/usr/bin/env bash
# Install what building and testing nginx-authentik needs. Idempotent and quiet when all is present.
#   .ci/deps.sh build   Debian packages for building the module, rustfmt and clippy
#   .ci/deps.sh test    build's, plus build/venv (t/requirements.txt), t/provider/node_modules, wrk, curl,
#                       chromium + chromium-driver (the demo's browser test)
#   .ci/deps.sh [all]   same as test
# Prints one line per thing it installs; exits non-zero with a one-line reason when it cannot.
set -euo pipefail

mode=${1:-all}
case "$mode" in
build | test | all) ;;
*)
    echo "usage: $0 [build|test|all]" >&2
    exit 2
    ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir="$root/build"

BUILD_APT=(nginx nginx-dev libclang-dev clang g++ pkg-config libssl-dev libpcre2-dev zlib1g-dev make dpkg-dev)
TEST_APT=(wrk curl chromium chromium-driver caddy redis-server)

say() { echo "deps: $*"; }
die() {
    echo "deps: error: $*" >&2
    exit 1
}

# --- privilege -------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    SUDO=(none)
fi
as_root() {
    if [ "${SUDO[0]-}" = none ]; then
        return 1
    fi
    "${SUDO[@]}" "$@"
}

# --- apt -------------------------------------------------------------------------------
apt_updated=0
policy_rc_created=0
cleanup() {
    if [ "$policy_rc_created" = 1 ]; then
        as_root rm -f /usr/sbin/policy-rc.d || true
    fi
}
trap cleanup EXIT

apt_missing() {
    local p missing=()
    for p in "$@"; do
        if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]; then
            missing+=("$p")
        fi
    done
    echo "${missing[@]}"
}

stop_debian_nginx() {
    # The nginx package starts Debian's service on port 80; tests run their own nginx.
    (as_root service nginx stop >/dev/null 2>&1) || true
    (as_root systemctl disable --now nginx >/dev/null 2>&1) || true
    (as_root update-rc.d nginx disable >/dev/null 2>&1) || true
    if [ -r /run/nginx.pid ]; then
        local pid
        pid=$(cat /run/nginx.pid 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            (as_root kill -QUIT "$pid") || true
        fi
    fi
}

apt_install() {
    local missing
    read -r -a missing <<<"$(apt_missing "$@")"
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "${SUDO[0]-}" = none ]; then
        die "missing Debian packages: ${missing[*]} (not root and no sudo: run 'apt-get install ${missing[*]}' as root)"
    fi
    local p
    for p in "${missing[@]}"; do say "installing apt package $p"; done
    local log="${TMPDIR:-/tmp}/nginx-authentik-apt.$$.log"
    # Keep services (nginx) from starting during the install, unless the machine already has a policy.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 0755 /usr/sbin/policy-rc.d
        policy_rc_created=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" = 0 ]; then
        if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1; then
            tail -n 5 "$log" >&2
            die "apt-get update failed (needed to install: ${missing[*]})"
        fi
        apt_updated=1
    fi
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null >"$log" 2>&1; then
        tail -n 10 "$log" >&2
        die "apt-get install failed for: ${missing[*]}"
    fi
    rm -f "$log"
    for p in "${missing[@]}"; do
        if [ "$p" = nginx ]; then stop_debian_nginx; fi
    done
    read -r -a missing <<<"$(apt_missing "$@")"
    [ "${#missing[@]}" -eq 0 ] || die "still missing after apt-get install: ${missing[*]}"
}

# --- rust ------------------------------------------------------------------------------
rust_components() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) and put ~/.cargo/bin on PATH"
    local c
    for c in rustfmt clippy; do
        if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
            command -v rustup >/dev/null 2>&1 || die "cargo $c missing and no rustup to add it"
            say "installing rust component $c"
            rustup component add "$c" >/dev/null 2>&1 || die "rustup component add $c failed"
        fi
    done
}

# --- python venv -----------------------------------------------------------------------
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

python_venv() {
    local req="$root/t/requirements.txt" venv="$build_dir/venv"
    [ -f "$req" ] || die "t/requirements.txt not found"
    local py=${PYTHON:-python3}
    command -v "$py" >/dev/null 2>&1 || die "python3 not found"
    local want
    want="$(hash_of "$req")-$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.requirements.stamp" 2>/dev/null || true)" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        say "creating python venv build/venv"
        mkdir -p "$build_dir"
        if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            # Debian's own python3 needs python3-venv for ensurepip.
            apt_install python3-venv
            "$py" -m venv "$venv" >/dev/null 2>&1 || die "'$py -m venv build/venv' failed"
        fi
    fi
    say "installing python packages from t/requirements.txt into build/venv"
    local log="$build_dir/venv/pip.log"
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >"$log" 2>&1; then
        tail -n 10 "$log" >&2
        die "pip install -r t/requirements.txt failed (log: build/venv/pip.log)"
    fi
    echo "$want" >"$venv/.requirements.stamp"
}

# --- node provider ---------------------------------------------------------------------
node_modules() {
    local dir="$root/t/provider"
    [ -f "$dir/package-lock.json" ] || die "t/provider/package-lock.json not found"
    if ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm
    fi
    local want stamp="$dir/node_modules/.nginx-authentik-lock.stamp"
    want="$(hash_of "$dir/package-lock.json" "$dir/package.json")-$(node --version)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
        return 0
    fi
    say "installing node packages in t/provider (npm ci)"
    mkdir -p "$build_dir"
    local log="$build_dir/npm-ci.log"
    if ! (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) >"$log" 2>&1; then
        tail -n 10 "$log" >&2
        die "npm ci in t/provider failed (log: build/npm-ci.log)"
    fi
    echo "$want" >"$stamp"
}

# --- main ------------------------------------------------------------------------------
command -v dpkg-query >/dev/null 2>&1 || die "not a Debian system (no dpkg-query); install the equivalents of: ${BUILD_APT[*]} ${TEST_APT[*]}"

if [ "$mode" = build ]; then
    apt_install "${BUILD_APT[@]}"
else
    apt_install "${BUILD_APT[@]}" "${TEST_APT[@]}"
fi
rust_components
if [ "$mode" != build ]; then
    python_venv
    node_modules
fi
