#!/usr/bin/env bash
# A bare Debian root filesystem for the image tests, built once and cached outside the repository.
#
#   tests/system/rootfs.sh bullseye      prints the directory (building it first when missing)
#
# debootstrap --variant=minbase --include=python3: what a slim research image has, nothing more.
# The cache survives between runs (JOBD_ROOTFS_CACHE, default /var/cache/jobd-test-rootfs);
# a finished tree is marked with .jobd-rootfs-ready holding the layout version below, so a build
# cut short, or one made for an older layout of this script, is made again.
# Needs root and debootstrap (./test.sh installs it).
set -euo pipefail
suite=${1:?usage: rootfs.sh SUITE}
layout="jobd rootfs layout 1"
cache=${JOBD_ROOTFS_CACHE:-/var/cache/jobd-test-rootfs}
dest=$cache/$suite
mkdir -p "$cache"

# One builder per suite at a time (CI and a developer may share the cache).
exec 9>"$cache/.$suite.lock"
flock 9
if [ "$(cat "$dest/.jobd-rootfs-ready" 2>/dev/null)" = "$layout" ]; then
    echo "$dest"
    exit 0
fi

# The mirror apt uses on this machine (deb822 or one-line sources), else deb.debian.org.
mirror=${JOBD_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
# ... and apt's proxy, when it has one.
if command -v apt-config >/dev/null; then
    eval "$(apt-config shell http_proxy Acquire::http::Proxy)"
    if [ -n "${http_proxy:-}" ]; then export http_proxy; fi
fi

rm -rf "$dest" "$cache/.$suite.tmp"
tmp=$cache/.$suite.tmp
started=$(date +%s)
if ! debootstrap --variant=minbase --include=python3 "$suite" "$tmp" "$mirror" >"$cache/$suite.log" 2>&1; then
    # A suite past its support moves to archive.debian.org: try there before giving up.
    echo "debootstrap $suite from $mirror failed (see $cache/$suite.log); trying archive.debian.org" >&2
    rm -rf "$tmp"
    debootstrap --variant=minbase --include=python3 "$suite" "$tmp" http://archive.debian.org/debian \
        >>"$cache/$suite.log" 2>&1 || { tail -n 20 "$cache/$suite.log" >&2; exit 1; }
fi

# The unprivileged user jobd runs as: uid 1000, HOME owned by root (unwritable), as in an image
# run with --user 1000 whose HOME nobody prepared.
grep -q '^research:' "$tmp/etc/passwd" || {
    echo 'research:x:1000:1000:research:/home/research:/bin/sh' >>"$tmp/etc/passwd"
    echo 'research:x:1000:' >>"$tmp/etc/group"
}
mkdir -p "$tmp/home/research"
chown 0:0 "$tmp/home/research"
chmod 755 "$tmp/home/research"
# Mount points: the zipapp is bind-mounted over an empty file, a pre-unpacked SHIV_ROOT (the
# way examples/Dockerfile.research prepares it) over /opt/jobd-cache.
: >"$tmp/usr/local/bin/jobd"
chmod 755 "$tmp/usr/local/bin/jobd"
mkdir -p "$tmp/opt/jobd-cache"
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
echo "$layout" >"$tmp/.jobd-rootfs-ready"
mv "$tmp" "$dest"
echo "built $dest in $(( $(date +%s) - started ))s ($(du -sh "$dest" | cut -f1))" >&2
echo "$dest"
