#!/usr/bin/env bash
# Puts the binaries of Debian's `prometheus` package (prometheus, promtool) into a project-local
# directory, without installing the package system-wide, and prints that bin directory.
# Idempotent: a second run only prints the path. Needs apt (Debian/Ubuntu); `apt-get update`
# is run (as root) only when the package cannot be downloaded with the current lists.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${GUARD_PROMETHEUS_DIR:-$root/.tools/prometheus}"
bin="$dest/usr/bin"

if [[ -x "$bin/promtool" && -x "$bin/prometheus" ]]; then
    echo "$bin"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install-prometheus: apt-get not found; install Prometheus 2.x and put promtool and" \
        "prometheus into $bin" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# Download as the invoking user (root in CI) rather than apt's sandbox user, which cannot
# write into a private temporary directory.
download() { apt-get download -q -o APT::Sandbox::User="$(id -un)" prometheus >&2; }
if ! download; then
    if [[ "$(id -u)" != 0 ]]; then
        echo "install-prometheus: could not download Debian's prometheus package; run" \
            "'sudo apt-get update' and retry" >&2
        exit 1
    fi
    echo "install-prometheus: refreshing the package lists (apt-get update)" >&2
    apt-get update -q >&2
    download
fi

rm -rf "$dest.partial"
mkdir -p "$dest.partial"
dpkg-deb -x prometheus_*.deb "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"
"$bin/promtool" --version >&2
echo "$bin"
