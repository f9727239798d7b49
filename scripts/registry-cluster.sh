#!/usr/bin/env bash
# Starts (or stops) a real 3-member etcd cluster of the agent registry on
# free loopback ports, with `kelpie registry serve`, for the walkthrough
# and for manual tests:
#   scripts/registry-cluster.sh start DIR   # prints KELPIE_REGISTRY=etcd://...; writes DIR/env
#   scripts/registry-cluster.sh stop DIR    # stops the members it started (by their pids)
# The Go tests start their own members the same way (cmd/kelpie/daemon_e2e_test.go).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
case "$cmd" in
start)
  mkdir -p "$dir"
  bin="$dir/kelpie"
  (cd "$here" && go build -o "$bin" ./cmd/kelpie)
  ports=$(python3 -c 'import socket
ss=[socket.socket() for _ in range(6)]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')
  read -r c0 c1 c2 p0 p1 p2 <<<"$ports"
  initial="m0=http://127.0.0.1:$p0,m1=http://127.0.0.1:$p1,m2=http://127.0.0.1:$p2"
  : >"$dir/pids"
  i=0
  for pair in "$c0:$p0" "$c1:$p1" "$c2:$p2"; do
    c=${pair%%:*}; p=${pair#*:}
    "$bin" registry serve --data "$dir/m$i" --listen "127.0.0.1:$c" --name "m$i" --peer "127.0.0.1:$p" \
      --initial-cluster "$initial" >"$dir/m$i.out" 2>"$dir/m$i.log" &
    echo $! >>"$dir/pids"
    i=$((i+1))
  done
  for i in 0 1 2; do
    for _ in $(seq 1 300); do [ -s "$dir/m$i.out" ] && break; sleep 0.1; done
    [ -s "$dir/m$i.out" ] || { echo "registry member m$i did not start:" >&2; cat "$dir/m$i.log" >&2; exit 1; }
  done
  echo "KELPIE_REGISTRY=etcd://127.0.0.1:$c0,127.0.0.1:$c1,127.0.0.1:$c2" | tee "$dir/env"
  ;;
stop)
  [ -f "$dir/pids" ] || exit 0
  while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$dir/pids"
  rm -f "$dir/pids"
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
