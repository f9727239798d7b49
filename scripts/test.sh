#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), starts a
# real SeaweedFS S3 server on loopback for the S3 store tests, then runs
# gofmt, go vet and the whole Go test suite (real QEMU VMs included), and
# the race detector over the concurrent packages.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/setup.sh

s3dir=$(mktemp -d /tmp/kelpie-s3.XXXXXX)
cleanup() { bash scripts/seaweedfs.sh stop "$s3dir" >/dev/null 2>&1 || true; rm -rf "$s3dir"; }
trap cleanup EXIT
if [ "${KELPIE_SKIP_S3:-0}" != 1 ]; then
  bash scripts/seaweedfs.sh start "$s3dir" >/dev/null
  # shellcheck disable=SC1091
  . "$s3dir/env"
fi

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.git/*'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change: $unformatted" >&2
  exit 1
fi
go vet ./...
go test -count=1 -timeout 30m ./...
go test -count=1 -race -timeout 20m ./teleport/... ./store/... ./vm/sim/ ./dst/...
