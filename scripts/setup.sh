#!/usr/bin/env bash
# Installs everything Kelpie Teleport needs on a bare Debian 12 machine, as
# root: apt packages, Go modules, QEMU and the guest image, and (unless
# KELPIE_SKIP_S3=1) the SeaweedFS server used by the S3 tests. Idempotent and
# quick when everything is cached.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

need_apt=()
for pair in time:/usr/bin/time curl:/usr/bin/curl; do
  pkg=${pair%%:*}; bin=${pair#*:}
  [ -x "$bin" ] || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock || true)" ]; then apt-get update -qq; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null; }
fi

# "all" also fetches what only tests on other platforms need (the vz glue type check).
go mod download all
bash scripts/setup-qemu.sh
if [ "${KELPIE_SKIP_S3:-0}" != 1 ]; then
  bash scripts/seaweedfs.sh build >/dev/null
fi
echo "setup: ready" >&2
