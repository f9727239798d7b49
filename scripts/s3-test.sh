#!/usr/bin/env bash
# Runs the S3 package store's tests against a real SeaweedFS server that
# lives only for the run: start it (scripts/seaweedfs.sh), run the tests
# with its endpoint and credentials in the environment, stop it.
#
#   scripts/s3-test.sh            unit + integration tests (-race), then the
#                                 1 GiB round trip and the peak-RSS check
#   scripts/s3-test.sh --short    unit + integration tests only (-race -short)
#   scripts/s3-test.sh --bench    also the throughput benchmark (1 GiB, 3 runs)
#
# Extra arguments after the mode go to every `go test` (e.g. -v, -run X).
# Everything listens on 127.0.0.1; the tests refuse any other endpoint.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

mode=full
case "${1:-}" in
--short) mode=short; shift ;;
--bench) mode=bench; shift ;;
--full) shift ;;
-h | --help) sed -n '2,13p' "$0"; exit 0 ;;
esac

DIR=$(mktemp -d "${TMPDIR:-/tmp}/kelpie-s3-test.XXXXXX")
cleanup() {
	"$ROOT/scripts/seaweedfs.sh" stop "$DIR" >/dev/null 2>&1 || true
	rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$ROOT/scripts/seaweedfs.sh" start "$DIR" >/dev/null
# shellcheck disable=SC1091
source "$DIR/env"
# The server's credentials, and nothing else from this machine's AWS setup:
# no profile, no session token, no metadata service.
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
export KELPIE_S3_ENDPOINT KELPIE_S3_BUCKET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION
echo "s3-test: SeaweedFS at $KELPIE_S3_ENDPOINT (bucket $KELPIE_S3_BUCKET)" >&2

# Under -race the big transfers are slow and memory-hungry, so they run
# (without -race) in a second pass.
go test -race -short -count=1 "$@" ./store/s3/
go test -race -short -count=1 -run 'S3|Progress' "$@" ./cmd/kelpie/
if [ "$mode" != short ]; then
	log="$DIR/big-tests.log"
	status=0
	go test -count=1 -timeout 20m -run 'TestIntegrationRoundTrip1GiB|TestIntegrationServerStoppedMidDownload|TestIntegrationPeakRSS' \
		-v "$@" ./store/s3/ >"$log" 2>&1 || status=$?
	grep -E '^(--- |ok|FAIL)|_test.go:' "$log" || true
	if [ "$status" -ne 0 ]; then
		tail -n 60 "$log"
		exit "$status"
	fi
fi
if [ "$mode" = bench ]; then
	go test -count=1 -timeout 30m -run '^$' -bench 'BenchmarkThroughput' -benchtime=3x "$@" ./store/s3/
fi
