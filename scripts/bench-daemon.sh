#!/usr/bin/env bash
# Benchmarks of the host daemon, each against a baseline measured in the
# same run (2 cores, noisy: ratios, side by side):
#  1. a move through the daemons (API call until "running on B") against
#     the CLI's teleport out + teleport in of the same VM, alternating
#     rounds (ROUNDS, default 4; each round moves A->B->A both ways);
#  2. the daemon's idle RSS with VMS (default 10) QEMU VMs, the registry
#     member (a separate `kelpie registry serve`) reported apart.
# Usage: scripts/bench-daemon.sh [ROUNDS] [VMS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-4}; nvms=${2:-10}
work=$(mktemp -d "${TMPDIR:-/tmp}/kelpie-bench-daemon.XXXXXX")
bin="$work/kelpie"
(cd "$here" && go build -o "$bin" ./cmd/kelpie)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for h in "$work/a" "$work/b"; do
    for v in $(KELPIE_HOME=$h "$bin" vm ls --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(v["name"] for v in json.load(sys.stdin)))' 2>/dev/null); do
      KELPIE_HOME=$h "$bin" vm rm "$v" >/dev/null 2>&1 || true
    done
  done
  rm -rf "$work"
}
trap cleanup EXIT
rp=$(free_port); pp=$(free_port)
"$bin" registry serve --data "$work/reg" --listen 127.0.0.1:$rp --peer 127.0.0.1:$pp >/dev/null 2>"$work/reg.log" &
regpid=$!; pids+=($regpid)
reg=etcd://127.0.0.1:$rp
pa=$(free_port); pb=$(free_port)
A=http://127.0.0.1:$pa; B=http://127.0.0.1:$pb
start_daemons() {
  "$bin" serve --home "$work/a" --listen 127.0.0.1:$pa --registry $reg --store "$work/store" >>"$work/a.log" 2>&1 &
  dpa=$!; pids+=($dpa)
  "$bin" serve --home "$work/b" --listen 127.0.0.1:$pb --registry $reg --store "$work/store" >>"$work/b.log" 2>&1 &
  dpb=$!; pids+=($dpb)
  for u in $A $B; do
    for _ in $(seq 1 300); do curl -sf "$u/readyz" >/dev/null && break; sleep 0.1; done
  done
}
stop_daemons() { kill -TERM $dpa $dpb; wait $dpa $dpb 2>/dev/null || true; }
now() { date +%s%N; }
start_daemons
ida=$(cat "$work/a/host-id"); idb=$(cat "$work/b/host-id")
"$bin" --server $A agent create bench --memory 256 >/dev/null 2>&1
"$bin" --server $A agent move bench --to $idb >/dev/null 2>&1   # warm both sides
"$bin" --server $B agent move bench --to $ida >/dev/null 2>&1
dmoves=(); cmoves=()
for r in $(seq 1 "$rounds"); do
  t0=$(now); "$bin" --server $A agent move bench --to $idb >/dev/null 2>&1; t1=$(now)
  "$bin" --server $B agent move bench --to $ida >/dev/null 2>&1; t2=$(now)
  dmoves+=($(( (t1-t0)/1000000 )) $(( (t2-t1)/1000000 )))
  stop_daemons
  t0=$(now)
  id=$(KELPIE_HOME=$work/a "$bin" teleport out bench --store "$work/store" 2>/dev/null)
  KELPIE_HOME=$work/b "$bin" teleport in "$id" --store "$work/store" --name bench >/dev/null 2>&1
  t1=$(now)
  id=$(KELPIE_HOME=$work/b "$bin" teleport out bench --store "$work/store" 2>/dev/null)
  KELPIE_HOME=$work/a "$bin" teleport in "$id" --store "$work/store" --name bench >/dev/null 2>&1
  t2=$(now)
  cmoves+=($(( (t1-t0)/1000000 )) $(( (t2-t1)/1000000 )))
  start_daemons
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
md=$(median "${dmoves[@]}"); mc=$(median "${cmoves[@]}")
echo "move through the daemons (ms): ${dmoves[*]}  median $md"
echo "CLI teleport out + in (ms):    ${cmoves[*]}  median $mc"
python3 -c "print('ratio daemons/CLI: %.2f (target <= 1.2)' % ($md/$mc))"

# Idle RSS with VMS VMs.
"$bin" --server $A agent rm bench >/dev/null 2>&1
for i in $(seq 1 "$nvms"); do "$bin" --server $A agent create "idle$i" --memory 128 >/dev/null 2>&1; done
sleep 5
rss() { awk '/^VmRSS/ {print $2}' /proc/$1/status; }
echo "daemon idle RSS with $nvms VMs: $(( $(rss $dpa) / 1024 )) MiB (target <= 64); the daemon with no VMs: $(( $(rss $dpb) / 1024 )) MiB"
echo "registry member (kelpie registry serve, apart): $(( $(rss $regpid) / 1024 )) MiB"
for i in $(seq 1 "$nvms"); do "$bin" --server $A agent rm "idle$i" >/dev/null 2>&1; done
