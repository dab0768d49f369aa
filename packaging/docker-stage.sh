#!/usr/bin/env bash
# Stage the module for the official nginx Docker image (nginx:<version>).
#   packaging/docker-stage.sh [--nginx-version V] [--module SO] OUTDIR
# Without --module, builds the module against nginx V with --with-compat (the official image's nginx
# is configured --with-compat, so a compat module of the same version loads into it). V defaults to
# the nginx bundled in the nginx-src crate (Cargo.lock), which builds offline; any other version is
# downloaded by nginx-src at build time (NGX_VERSION), so it needs network access (docker build).
# With --module, stages that prebuilt .so instead (make docker-image passes the vendored build);
# it must have been built for V.
# OUTDIR gets:
#   modules/ngx_http_authentik_module.so   -> COPY to /etc/nginx/modules/
#   load_module.conf                       the load_module line (main context)
#   nginx.conf                             the official image's nginx.conf layout, module loaded
#   enable-module.sh                       adds the load_module line to an existing nginx.conf
#   nginx-version                          the nginx version the module is for
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
modname=ngx_http_authentik_module

die() {
    echo "docker-stage: $*" >&2
    exit 1
}
usage() {
    echo "usage: $0 [--nginx-version V] [--module SO] OUTDIR" >&2
    exit 2
}

bundled_version() {
    # nginx-src's version carries the nginx version as build metadata: 1.28.5+1.28.3 -> 1.28.3
    awk '/^name = "nginx-src"$/ { getline; gsub(/"/, "", $3); sub(/^[^+]*\+/, "", $3); print $3; exit }' \
        "$root/Cargo.lock"
}

version=""
module=""
outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
    --nginx-version) [ $# -ge 2 ] || usage; version=$2; shift 2 ;;
    --module) [ $# -ge 2 ] || usage; module=$2; shift 2 ;;
    -h | --help) usage ;;
    -*) usage ;;
    *) [ -z "$outdir" ] || usage; outdir=$1; shift ;;
    esac
done
[ -n "$outdir" ] || usage

bundled=$(bundled_version)
[ -n "$bundled" ] || die "cannot find the nginx-src version in Cargo.lock"
version=${version:-$bundled}
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "bad nginx version: $version"

if [ -z "$module" ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found"
    if [ "$version" = "$bundled" ]; then
        target=${CARGO_TARGET_DIR:-$root/build/target-vendored}
        unset NGX_VERSION
    else
        target=${CARGO_TARGET_DIR:-$root/build/target-nginx-$version}
        echo "docker-stage: nginx $version is not the bundled $bundled: nginx-src downloads it" >&2
        export NGX_VERSION=$version
    fi
    echo "docker-stage: building the module against nginx $version (--with-compat)" >&2
    (cd "$root" && CARGO_TARGET_DIR=$target cargo build --locked --release -p nginx-authentik --features vendored)
    module=$target/release/lib$modname.so
    # Check that what was compiled is the nginx we asked for.
    objs=$(ls -td "$target"/release/build/nginx-sys-*/out/objs 2>/dev/null | head -n1 || true)
    if [ -n "$objs" ] && [ -x "$objs/nginx" ]; then
        built=$("$objs/nginx" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
        [ "$built" = "$version" ] || die "built against nginx $built, wanted $version"
        "$objs/nginx" -V 2>&1 | grep -q -- '--with-compat' || die "nginx $built was not configured --with-compat"
    fi
fi
[ -f "$module" ] || die "module not found: $module"

mkdir -p "$outdir/modules"
install -m 0644 "$module" "$outdir/modules/$modname.so"
echo "load_module modules/$modname.so;" >"$outdir/load_module.conf"
{
    cat "$outdir/load_module.conf"
    cat "$here/docker/nginx.conf"
} >"$outdir/nginx.conf"
install -m 0755 "$here/docker/enable-module.sh" "$outdir/enable-module.sh"
echo "$version" >"$outdir/nginx-version"
echo "docker-stage: staged module for nginx:$version in $outdir" >&2
