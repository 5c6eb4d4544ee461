#!/usr/bin/env bash
# Tools the deployment tests need beyond pip: promtool and the Prometheus server (Debian's
# `prometheus` package), and checkov in a virtualenv of its own. Idempotent; called by
# `make venv`. Usage: scripts/install-tools.sh <venv dir>
set -euo pipefail
VENV="${1:-.venv}"
TOOLS="$VENV/tools"
mkdir -p "$TOOLS"

# promtool + prometheus: the binaries are extracted from the .deb instead of installing the
# package, so no prometheus service is started or enabled (the package's postinst would run
# its init script) and no system user is added. An existing promtool on PATH is used as is.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$TOOLS/prometheus/usr/bin/promtool" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        apt-get update -qq >/dev/null || true
        # _apt cannot write into a private temp dir: let it download into a 0755 one.
        chmod 0755 "$work"
        if (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1); then
            rm -rf "$TOOLS/prometheus"
            dpkg-deb -x "$work"/prometheus_*.deb "$TOOLS/prometheus"
            rm -rf "$TOOLS/prometheus/etc" "$TOOLS/prometheus/lib"
        else
            echo "install-tools: Debian's prometheus package could not be downloaded;" \
                 "the alert rule tests will skip" >&2
        fi
    else
        echo "install-tools: no promtool and no apt-get; the alert rule tests will skip" >&2
    fi
fi
for tool in promtool prometheus; do
    if [ -x "$TOOLS/prometheus/usr/bin/$tool" ]; then
        ln -sf "$(cd "$TOOLS/prometheus/usr/bin" && pwd)/$tool" "$VENV/bin/$tool"
    fi
done

# checkov pins versions of libraries the project also uses; its own venv keeps them apart.
# With the project venv's uv (see the Makefile) it installs in about a minute instead of
# several; plain pip otherwise.
if [ ! -x "$TOOLS/checkov/bin/checkov" ]; then
    if [ -x "$VENV/bin/uv" ]; then
        "$VENV/bin/uv" venv -q --python python3 "$TOOLS/checkov" &&
            "$VENV/bin/uv" pip install -q --python "$TOOLS/checkov/bin/python" "checkov>=3.2"
    else
        python3 -m venv "$TOOLS/checkov" && "$TOOLS/checkov/bin/pip" install -q "checkov>=3.2"
    fi || {
        echo "install-tools: checkov could not be installed; the checkov test will skip" >&2
        rm -rf "$TOOLS/checkov"
    }
fi
if [ -x "$TOOLS/checkov/bin/checkov" ]; then
    ln -sf "$(cd "$TOOLS/checkov/bin" && pwd)/checkov" "$VENV/bin/checkov"
fi
