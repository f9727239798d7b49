#!/usr/bin/env bash
# Nightly deterministic-simulation sweep of Kelpie Teleport.
#
# Builds kelpie, then for each fault profile and host count runs a sweep of
# SIM_SEEDS seeds x SIM_STEPS steps, twice, and checks that both runs print
# the same trace hash (determinism). Exits non-zero if any invariant was
# violated or a sweep was not reproducible; every failure line on stderr
# carries the exact command that replays it.
#
# Environment:
#   SIM_SEEDS       seeds per sweep (default 10000)
#   SIM_STEPS       steps per seed (default 200)
#   SIM_START_SEED  first seed (default: days since 1970 x SIM_SEEDS, so each
#                   night explores new seeds; it is printed for replay)
#   SIM_PROFILES    fault profiles (default "none default heavy")
#   SIM_HOSTS       host counts (default "2 4 8")
#   SIM_OUT         directory for the JSON summaries (default a temp dir)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEEDS=${SIM_SEEDS:-10000}
STEPS=${SIM_STEPS:-200}
START=${SIM_START_SEED:-$(( $(date -u +%s) / 86400 * SEEDS ))}
PROFILES=${SIM_PROFILES:-none default heavy}
HOSTS=${SIM_HOSTS:-2 4 8}
OUT=${SIM_OUT:-$(mktemp -d)}
mkdir -p "$OUT"

log() { echo "sim-sweep: $*" >&2; }

GO=$(command -v go || true)
[[ -n $GO ]] || { [[ -x /usr/local/go/bin/go ]] && GO=/usr/local/go/bin/go; } || { log "go toolchain not found"; exit 1; }
BIN="$OUT/kelpie"
(cd "$ROOT" && "$GO" build -o "$BIN" ./cmd/kelpie)

hash_of() { sed -n 's/.*"trace_hash":"\([0-9a-f]*\)".*/\1/p' "$1"; }

log "seeds $START..$((START + SEEDS - 1)), $STEPS steps, profiles [$PROFILES], hosts [$HOSTS]; summaries in $OUT"
status=0
for profile in $PROFILES; do
	for hosts in $HOSTS; do
		name="$profile-h$hosts"
		for pass in 1 2; do
			t0=$(date +%s)
			set +e
			"$BIN" sim --seeds "$SEEDS" --start-seed "$START" --steps "$STEPS" --hosts "$hosts" \
				--faults "$profile" --json >"$OUT/$name.$pass.json" 2>"$OUT/$name.$pass.err"
			rc=$?
			set -e
			log "$name pass $pass: exit $rc in $(( $(date +%s) - t0 ))s: $(cut -c1-160 "$OUT/$name.$pass.json")"
			if (( rc != 0 )); then
				status=1
				cat "$OUT/$name.$pass.err" >&2
				break
			fi
		done
		if [[ -s $OUT/$name.2.json ]] && [[ $(hash_of "$OUT/$name.1.json") != $(hash_of "$OUT/$name.2.json") ]]; then
			log "$name: NOT DETERMINISTIC: trace hashes $(hash_of "$OUT/$name.1.json") vs $(hash_of "$OUT/$name.2.json")"
			status=1
		fi
	done
done
if (( status == 0 )); then
	log "all sweeps passed and were reproducible"
fi
exit "$status"
