#!/bin/sh
# Load the authentik module from an nginx.conf laid out like the official image's:
# puts "load_module modules/ngx_http_authentik_module.so;" on the first line. Idempotent.
#   enable-module.sh [/etc/nginx/nginx.conf]
set -eu
conf=${1:-/etc/nginx/nginx.conf}
line='load_module modules/ngx_http_authentik_module.so;'
[ -f "$conf" ] || {
    echo "enable-module: $conf not found" >&2
    exit 1
}
if grep -qxF "$line" "$conf"; then
    exit 0
fi
tmp="$conf.authentik.$$"
{
    echo "$line"
    cat "$conf"
} >"$tmp"
# Rewrite in place (keeps the file's owner and mode).
cat "$tmp" >"$conf"
rm -f "$tmp"
