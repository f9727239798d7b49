#!/usr/bin/env bash
# The test command: installs what is missing (scripts/setup.sh), starts a
# real SeaweedFS S3 server on loopback for the S3 store tests, then runs
# gofmt, go vet, the whole Go test suite (real QEMU VMs, the real S3
# server, real etcd members and 3-member clusters on loopback, and kelpie
# daemons killed with SIGKILL included) and the race detector over the
# concurrent packages.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/setup.sh

s3dir=$(mktemp -d "${TMPDIR:-/tmp}/kelpie-s3.XXXXXX")
cleanup() { bash scripts/seaweedfs.sh stop "$s3dir" >/dev/null 2>&1 || true; rm -rf "$s3dir"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ "${KELPIE_SKIP_S3:-0}" != 1 ]; then
  bash scripts/seaweedfs.sh start "$s3dir" >/dev/null
  # shellcheck disable=SC1091
  . "$s3dir/env"
  # The test server's credentials and nothing else from this machine's AWS
  # setup: no profile, no session token, no metadata service.
  unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE
  export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
  export KELPIE_S3_ENDPOINT KELPIE_S3_BUCKET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION
  echo "test: SeaweedFS S3 at $KELPIE_S3_ENDPOINT" >&2
fi
# Real-VM tests must run, not skip, here: setup installed QEMU and the image.
export KELPIE_QEMU_TESTS=${KELPIE_QEMU_TESTS:-1}

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.git/*'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change: $unformatted" >&2
  exit 1
fi
go vet ./...
go test -count=1 -timeout 30m ./...
go test -count=1 -race -short -timeout 20m . ./blob/ ./service/ ./host/ ./store/... ./vm/ ./vm/sim/ ./vm/hostvm/... ./dst/ ./guest/agent/... \
  ./registry/... ./fleet/ ./server/
