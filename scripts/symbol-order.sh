#!/usr/bin/env bash
# Makes proxy/link/symbol-order.txt: the sidecar's functions in the order the linker should lay
# them out, those an idle sidecar has run first, then those a connection runs (proxy/build.rs
# says why). It runs the benchmark's Trellis pair once under valgrind's callgrind, which records
# every function each sidecar executes: the list as the pair sits idle (certificate issued,
# snapshot applied, probes answered), then what the benchmark's traffic adds.
#
# Symbol names carry hashes of the toolchain, Cargo.lock and the build's settings, so the list
# matches only the build it was made from: `cargo build --profile dist -p trellis-proxy --bin
# trellis-proxy` with the same rustc. Refresh it after a toolchain or dependency update (the
# file's header names both, and proxy/build.rs warns when a build has another), and check what
# a build finds of it with --check.
#
#   scripts/symbol-order.sh           build, run, and rewrite proxy/link/symbol-order.txt
#   scripts/symbol-order.sh --check   how many of its names the dist sidecar defines
#
# Needs valgrind (callgrind_control) and binutils (nm). Takes about two minutes beyond the builds.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
order=$repo/proxy/link/symbol-order.txt
sidecar=$repo/target/dist/trellis-proxy
cd "$repo"

# The names of the functions an executable defines, one a line.
defined() {
    nm --defined-only "$1" | awk '$2 ~ /^[tTwW]$/ { print $3 }' | sort -u
}

# The toolchain and lock file the list is for, as its header says them.
provenance() {
    echo "# rustc: $(rustc --version)"
    echo "# Cargo.lock: sha256 $(sha256sum Cargo.lock | cut -d' ' -f1)"
}

build_sidecar() {
    cargo build --profile dist -p trellis-proxy --bin trellis-proxy
}

if [[ ${1:-} == --check ]]; then
    [[ -x $sidecar ]] || build_sidecar
    listed=$(grep -vc '^#' "$order" || true)
    found=$(comm -12 <(grep -v '^#' "$order" | sort -u) <(defined "$sidecar") | wc -l)
    echo "$sidecar defines $found of the $listed functions in $order"
    if ! diff -q <(grep '^# rustc\|^# Cargo.lock' "$order") <(provenance) > /dev/null; then
        echo "the list was made for another toolchain or lock file:"
        diff <(grep '^# rustc\|^# Cargo.lock' "$order") <(provenance) || true
    fi
    exit 0
fi

for tool in callgrind_control valgrind nm; do
    command -v "$tool" > /dev/null || { echo "symbol-order: $tool is not installed" >&2; exit 1; }
done

build_sidecar
cargo build --release -p trellis-tests --bin trellis-bench \
    -p trellis-control-plane --bin trellis-control-plane --bin trellisctl

work=$(mktemp -d -t trellis-symbol-order-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/out"
cp "$sidecar" "$work/trellis-proxy.real"
ln -s "$repo/target/release/trellis-control-plane" "$repo/target/release/trellisctl" "$work/bin/"
cat > "$work/bin/trellis-proxy" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --callgrind-out-file=$work/out/callgrind.%p \
    $work/trellis-proxy.real "\$@"
EOF
chmod +x "$work/bin/trellis-proxy"

# The benchmark measures the idle pair first, then starts its traffic with the bulk scenario:
# each sidecar's counts are dumped in between (callgrind.PID.1), the rest at its exit.
: > "$work/bench.log"
TRELLIS_BIN_DIR=$work/bin target/release/trellis-bench --quick --only trellis \
    --no-control-plane --no-wrk --json "$work/bench.json" > "$work/bench.log" 2>&1 &
bench=$!
until grep -q 'bulk 1 stream' "$work/bench.log"; do
    kill -0 "$bench" 2> /dev/null || { cat "$work/bench.log" >&2; exit 1; }
    sleep 0.05
done
for pid in $(pgrep -f "$work/trellis-proxy.real"); do
    callgrind_control --dump=idle "$pid" > /dev/null 2>&1
done
wait "$bench" || { cat "$work/bench.log" >&2; exit 1; }

# Function names as callgrind's files give them (`fn=(id) name` the first time, `fn=(id)` after).
functions() {
    awk 'match($0, /^c?fn=\([0-9]+\)/) {
             id = substr($0, RSTART, RLENGTH); sub(/^c/, "", id)
             if (length($0) > RLENGTH) name[FILENAME, id] = substr($0, RLENGTH + 2)
             n = name[FILENAME, id]
             if (n != "" && !(n in seen)) { seen[n] = 1; print n }
         }' "$@"
}

idle=$(ls "$work"/out/callgrind.*.1)
busy=$(ls "$work"/out/callgrind.* | grep -v '\.1$')
defined "$work/trellis-proxy.real" > "$work/defined"
{
    echo "# The order proxy/build.rs gives the linker for the sidecar's functions: those an idle"
    echo "# sidecar ran, then those its traffic added. Made by scripts/symbol-order.sh for the build"
    echo "# \`cargo build --profile dist -p trellis-proxy --bin trellis-proxy\` with:"
    provenance
    # Each part sorted by name, so that a refresh changes only the lines that differ.
    # shellcheck disable=SC2086
    functions $idle | grep -Fxf "$work/defined" | LC_ALL=C sort -u > "$work/idle"
    # shellcheck disable=SC2086
    functions $busy | grep -Fxf "$work/defined" | LC_ALL=C sort -u | LC_ALL=C comm -23 - "$work/idle" > "$work/busy"
    cat "$work/idle" "$work/busy"
} > "$order.new"
mv "$order.new" "$order"
echo "wrote $order: $(grep -vc '^#' "$order") functions, $(wc -l < "$work/idle") of them run by an idle sidecar"
