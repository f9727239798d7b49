#!/usr/bin/env bash
# Measures `kelpie blob pack` and `kelpie blob unpack` of a memory section
# against `cp` of the same bytes on the same disk, side by side, several
# rounds, and reports throughput ratios and peak RSS (from /usr/bin/time -v).
#
#   scripts/bench-blob.sh [SIZE_MIB] [ROUNDS]     (default 1024 MiB, 3 rounds)
set -euo pipefail
size_mib=${1:-1024}
rounds=${2:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${KELPIE_BENCH_DIR:-$here}/.bench-blob.XXXXXX")
trap 'rm -rf "$work"' EXIT
[ -x /usr/bin/time ] || { echo "bench-blob: /usr/bin/time is missing (apt-get install time)" >&2; exit 1; }

(cd "$here" && go build -o "$work/kelpie" ./cmd/kelpie)
# Non-sparse, incompressible-ish input so no one gets to skip holes.
head -c $((size_mib * 1024 * 1024)) /dev/urandom > "$work/memory"
printf '{"snapshot_id":"bench","vm_id":"bench","created_at_ms":0,"size_bytes":0,"checksum":0,"architecture":"x86_64","vcpu_count":1,"memory_mib":%d,"is_full_snapshot":true}' "$size_mib" > "$work/metadata"
head -c 65536 /dev/urandom > "$work/snapshot"
sync

# t CMD...: runs CMD under /usr/bin/time, prints "seconds max_rss_kib".
t() {
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null
  cat "$work/time"
}

printf '%-6s %-10s %-10s %-10s %-10s %-10s %-10s\n' round cp_s pack_s unpack_s pack/cp unpack/cp rss_MiB
best_pack=0 best_unpack=0 max_rss=0
for r in $(seq 1 "$rounds"); do
  rm -f "$work/cp.out" "$work/blob"; rm -rf "$work/un"; sync
  read -r cp_s _ < <(t cp "$work/memory" "$work/cp.out"); sync
  read -r pack_s pack_rss < <(t "$work/kelpie" blob pack --format v1 --metadata "$work/metadata" --snapshot "$work/snapshot" --memory "$work/memory" --out "$work/blob"); sync
  read -r unpack_s unpack_rss < <(t "$work/kelpie" blob unpack "$work/blob" --out-dir "$work/un"); sync
  cmp -s "$work/memory" "$work/un/memory" || { echo "bench-blob: unpacked memory differs" >&2; exit 1; }
  # Throughput ratio = cp time / our time (>1 means faster than cp).
  pr=$(awk -v a="$cp_s" -v b="$pack_s" 'BEGIN{printf "%.2f", (b>0?a/b:0)}')
  ur=$(awk -v a="$cp_s" -v b="$unpack_s" 'BEGIN{printf "%.2f", (b>0?a/b:0)}')
  rss=$(( (pack_rss > unpack_rss ? pack_rss : unpack_rss) / 1024 ))
  printf '%-6s %-10s %-10s %-10s %-10s %-10s %-10s\n' "$r" "$cp_s" "$pack_s" "$unpack_s" "$pr" "$ur" "$rss"
  [ "$rss" -gt "$max_rss" ] && max_rss=$rss
done
echo "size ${size_mib} MiB; ratio = cp seconds / kelpie seconds (target >= 0.8); peak RSS max ${max_rss} MiB (target <= 64)"
