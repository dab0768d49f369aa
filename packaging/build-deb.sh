#!/usr/bin/env bash
# Build the Debian package of the module for the nginx installed on this machine.
#   packaging/build-deb.sh <module.so> <outdir>
# Writes <outdir>/libnginx-mod-http-authentik_<version>_<arch>.deb and prints its path.
# The module must have been built against this machine's nginx-dev headers (make module): the
# package depends on the nginx ABI that the installed nginx package provides.
# Environment: DEB_VERSION (default: the Cargo workspace version), NGINX_ABI (default: from the
# installed nginx package's Provides), DEB_MAINTAINER.
set -euo pipefail

usage() {
    echo "usage: $0 <module.so> <outdir>" >&2
    exit 2
}
[ $# -eq 2 ] || usage
so=$1
outdir=$2
[ -f "$so" ] || {
    echo "build-deb: module not found: $so (run 'make module')" >&2
    exit 1
}

[ "$(head -c4 "$so" | od -An -c | tr -d ' ')" = '177ELF' ] || {
    echo "build-deb: not an ELF shared object: $so" >&2
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
pkg=libnginx-mod-http-authentik
modname=ngx_http_authentik_module
confname=mod-http-authentik.conf
linkname=50-mod-http-authentik.conf

die() {
    echo "build-deb: $*" >&2
    exit 1
}
for tool in dpkg-deb dpkg-query dpkg md5sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install dpkg-dev)"
done

# Version: [workspace.package] version in Cargo.toml.
workspace_version() {
    awk '
        /^\[/ { in_ws = ($0 == "[workspace.package]") ; next }
        in_ws && /^[[:space:]]*version[[:space:]]*=/ {
            sub(/^[^=]*=[[:space:]]*"/, ""); sub(/".*$/, ""); print; exit
        }' "$root/Cargo.toml"
}
version=${DEB_VERSION:-$(workspace_version)}
[ -n "$version" ] || die "cannot read [workspace.package] version from Cargo.toml"

# nginx ABI: the virtual package Debian's nginx provides (e.g. nginx-abi-1.22.1-7).
nginx_abi() {
    local p provides
    for p in nginx nginx-core nginx-light nginx-full nginx-extras; do
        provides=$(dpkg-query -W -f='${db:Status-Status} ${Provides}\n' "$p" 2>/dev/null || true)
        case "$provides" in installed\ *) ;; *) continue ;; esac
        echo "$provides" | tr ',' '\n' | sed -n 's/^[[:space:]]*\(nginx-abi-[^[:space:]]*\).*/\1/p' | head -n1
        return 0
    done
}
abi=${NGINX_ABI:-$(nginx_abi)}
[ -n "$abi" ] || die "cannot find the nginx ABI (no installed nginx package provides nginx-abi-*); install nginx or set NGINX_ABI"

arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-"nginx-authentik developers <nginx-authentik@users.noreply.github.com>"}

work=$(mktemp -d "${TMPDIR:-/tmp}/build-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
umask 022
pkgroot="$work/root"

install -d "$pkgroot/DEBIAN" \
    "$pkgroot/usr/lib/nginx/modules" \
    "$pkgroot/usr/share/nginx/modules-available" \
    "$pkgroot/usr/share/doc/$pkg"
install -m 0644 "$so" "$pkgroot/usr/lib/nginx/modules/$modname.so"
# Debian ships modules stripped; keep the symbol table nginx needs (dynamic symbols stay anyway).
if command -v strip >/dev/null 2>&1; then
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkgroot/usr/lib/nginx/modules/$modname.so"
fi
echo "load_module modules/$modname.so;" >"$pkgroot/usr/share/nginx/modules-available/$confname"

cat >"$pkgroot/usr/share/doc/$pkg/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: nginx-authentik
Source: $(sed -n 's/^repository[[:space:]]*=[[:space:]]*"\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)

Files: *
Copyright: nginx-authentik developers
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 can be found in
 /usr/share/common-licenses/Apache-2.0.
EOF

# Shared library dependencies: dpkg-shlibdeps needs a debian/control to run from.
shlib_depends() {
    command -v dpkg-shlibdeps >/dev/null 2>&1 || return 1
    local d="$work/shlibs"
    mkdir -p "$d/debian"
    printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$pkg" "$pkg" >"$d/debian/control"
    (cd "$d" && dpkg-shlibdeps -O -e"$pkgroot/usr/lib/nginx/modules/$modname.so" 2>/dev/null) |
        sed -n 's/^shlibs:Depends=//p'
}
shlibs=$(shlib_depends || true)
[ -n "$shlibs" ] || shlibs="libc6 (>= 2.34), libgcc-s1 (>= 4.2)"

installed_size=$(du -sk --exclude=DEBIAN "$pkgroot" | cut -f1)

cat >"$pkgroot/DEBIAN/control" <<EOF
Package: $pkg
Source: nginx-authentik
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $abi, $shlibs
Recommends: nginx
Section: httpd
Priority: optional
Homepage: https://github.com/nginx-authentik/nginx-authentik
Description: authentik authentication module for Nginx
 The ngx_http_authentik module makes nginx act as an authentik outpost: it
 protects locations with OpenID Connect single sign-on against an authentik
 provider, keeps sessions in shared memory, and passes the authenticated
 user's identity to the upstream in request headers.
EOF

# Maintainer scripts. The symlink in modules-enabled follows the convention of Debian's
# libnginx-mod-* packages: "remove" parks it as <link>.removed so that a later reinstall restores
# it, "purge" deletes it, and an admin who deleted the link keeps it deleted across upgrades.
cat >"$pkgroot/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
available=/usr/share/nginx/modules-available/$confname
enabled=/etc/nginx/modules-enabled/$linkname

if [ "\$1" = configure ]; then
    restore=no
    if [ -L "\$enabled.removed" ]; then
        rm -f "\$enabled.removed"
        restore=yes
    fi
    # \$2 is the previously configured version: empty on a first install.
    if [ -z "\$2" ] || [ "\$restore" = yes ]; then
        mkdir -p /etc/nginx/modules-enabled
        ln -sfn "\$available" "\$enabled"
    fi
    if command -v dpkg-trigger >/dev/null 2>&1; then
        dpkg-trigger --no-await nginx-reload || true
    fi
fi
exit 0
EOF

cat >"$pkgroot/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
enabled=/etc/nginx/modules-enabled/$linkname

case "\$1" in
remove | deconfigure)
    if [ -L "\$enabled" ]; then
        mv -f "\$enabled" "\$enabled.removed"
    fi
    ;;
esac
exit 0
EOF

cat >"$pkgroot/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
enabled=/etc/nginx/modules-enabled/$linkname

case "\$1" in
remove)
    if [ -L "\$enabled" ]; then
        mv -f "\$enabled" "\$enabled.removed"
    fi
    if command -v dpkg-trigger >/dev/null 2>&1; then
        dpkg-trigger --no-await nginx-reload || true
    fi
    ;;
purge)
    for link in "\$enabled" "\$enabled.removed"; do
        if [ -L "\$link" ]; then
            rm -f "\$link"
        fi
    done
    ;;
esac
exit 0
EOF
chmod 0755 "$pkgroot/DEBIAN/postinst" "$pkgroot/DEBIAN/prerm" "$pkgroot/DEBIAN/postrm"

(cd "$pkgroot" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
    >"$pkgroot/DEBIAN/md5sums"
chmod 0644 "$pkgroot/DEBIAN/control" "$pkgroot/DEBIAN/md5sums"

mkdir -p "$outdir"
deb="$outdir/${pkg}_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkgroot" "$deb" >/dev/null
echo "$deb"
