#!/usr/bin/env bash
# The figures of KLP1 version 2 (README, "Performance"), every one a ratio
# against a baseline measured in the same run, side by side:
#
#   1. chunk size and hash, studied on real QEMU guests (tools/memstudy):
#      a freshly booted 256 MiB guest, a sibling booted from the same
#      image, the first again after 5 s idle and after writing 8 MiB of
#      random data
#   2. encode/decode of a booted guest's pages that hold data against
#      zstd -1 -T2 / zstd -d -T2 of the same bytes
#   3. `kelpie blob pack --format v2` / `blob unpack` against cp of the same
#      bytes: a 1 GiB incompressible file, the booted guest's raw RAM image,
#      and a 1 GiB guest's (peak RSS of each from /usr/bin/time)
#   4. teleports through a filesystem store and SeaweedFS, v2 against v1
#      (go test -bench CompactPackages ./vm/qemu/), and the verified chunk
#      download against a plain GET (go test -bench ChunkDownload ./store/s3/)
#
#   scripts/bench-v2.sh [ROUNDS]     (default 5 rounds for 2 and 3)
#
# Installs what it needs (zstd, time) with apt-get, builds kelpie, boots
# QEMU guests under TCG in a home of its own, and starts a SeaweedFS
# server on loopback for part 4 (scripts/seaweedfs.sh). Files go to
# KELPIE_BENCH_DIR (default /dev/shm: in RAM, so that disk writeback does
# not land at random on one side of a comparison). No guest runs while
# parts 2 and 3 measure. Takes 10-15 min.
set -euo pipefail
rounds=${1:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
need=()
command -v zstd >/dev/null || need+=(zstd)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "bench-v2: install ${need[*]} (apt-get install ${need[*]})" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi
bash scripts/setup.sh >/dev/null

bdir=${KELPIE_BENCH_DIR:-/dev/shm}
[ -d "$bdir" ] || bdir=/tmp
work=$(mktemp -d "$bdir/kelpie-bench-v2.XXXXXX")
s3dir="$work/s3"
export KELPIE_HOME="$work/home"
cleanup() {
  for v in first sibling big; do "$work/kelpie" vm rm "$v" >/dev/null 2>&1 || true; done
  bash scripts/seaweedfs.sh stop "$s3dir" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/kelpie" ./cmd/kelpie
go build -o "$work/memstudy" ./tools/memstudy
k() { "$work/kelpie" "$@"; }

# raw NAME FILE: the guest's RAM as a raw image, through a v2 snapshot.
raw() {
  k vm snapshot "$1" --out "$work/$1.klp1" 2>/dev/null
  rm -rf "$work/un"
  k blob unpack "$work/$1.klp1" --out-dir "$work/un"
  mv "$work/un/memory" "$2"
}

echo "== 1. chunk size and hash on real guests (256 MiB, TCG)"
k vm create first --memory 256 >/dev/null 2>&1
k vm create sibling --memory 256 >/dev/null 2>&1
sleep 5
raw first "$work/first0.img"
raw sibling "$work/sibling0.img"
sleep 5
raw first "$work/first1.img"
k vm exec first -- sh -c 'head -c 8388608 /dev/urandom > /tmp/random.bin' >/dev/null
raw first "$work/first2.img"
"$work/memstudy" chunks "$work/first0.img" "$work/sibling0.img" "$work/first1.img" "$work/first2.img"
"$work/memstudy" hash "$work/first0.img"
k vm rm sibling >/dev/null
k vm create big --memory 1024 >/dev/null 2>&1
sleep 5
raw big "$work/big.img"
k vm rm big >/dev/null
k vm rm first >/dev/null

echo "== 2. codec against zstd on a booted guest's pages that hold data"
"$work/memstudy" nonzero "$work/first0.img" "$work/first0.nz"
"$work/memstudy" versus "$work/first0.nz" "$rounds"

echo "== 3. blob pack/unpack against cp"
head -c $((1024 * 1024 * 1024)) /dev/urandom > "$work/random.img"
# The guest's image with its holes filled: every zero page written out,
# as a backend that writes guest RAM whole would leave it.
cp --sparse=never "$work/first0.img" "$work/first0-dense.img"
printf '{"snapshot_id":"bench"}' > "$work/md"
head -c 65536 /dev/urandom > "$work/st"
sync
# t CMD...: "seconds max_rss_KiB" of CMD.
t() {
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null
  cat "$work/time"
}
for input in random.img first0.img first0-dense.img big.img; do
  src="$work/$input"
  printf '%s (%d MiB, %d MiB allocated)\n' "$input" $(( $(stat -c %s "$src") >> 20 )) $(( $(stat -c %b "$src") * 512 >> 20 ))
  printf '  %-6s %-8s %-8s %-8s %-9s %-10s %-9s %-9s\n' round cp_s pack_s unpack_s pack/cp unpack/cp pack_MiB unpack_MiB
  pr_all="" ur_all="" rss_max=0
  for r in $(seq 1 "$rounds"); do
    rm -f "$work/cp.out" "$work/b.klp1"; rm -rf "$work/un"; sync
    read -r cp_s _ < <(t cp "$src" "$work/cp.out"); sync
    read -r pack_s pack_rss < <(t "$work/kelpie" blob pack --metadata "$work/md" --snapshot "$work/st" --memory "$src" --out "$work/b.klp1"); sync
    read -r unpack_s unpack_rss < <(t "$work/kelpie" blob unpack "$work/b.klp1" --out-dir "$work/un"); sync
    cmp -s "$src" "$work/un/memory" || { echo "bench-v2: unpacked memory differs from $input" >&2; exit 1; }
    pr=$(awk -v a="$cp_s" -v b="$pack_s" 'BEGIN{printf "%.2f", (b>0?a/b:0)}')
    ur=$(awk -v a="$cp_s" -v b="$unpack_s" 'BEGIN{printf "%.2f", (b>0?a/b:0)}')
    pr_all="$pr_all $pr" ur_all="$ur_all $ur"
    printf '  %-6s %-8s %-8s %-8s %-9s %-10s %-9s %-9s\n' "$r" "$cp_s" "$pack_s" "$unpack_s" "$pr" "$ur" $((pack_rss / 1024)) $((unpack_rss / 1024))
    [ $((pack_rss / 1024)) -gt "$rss_max" ] && rss_max=$((pack_rss / 1024))
    [ $((unpack_rss / 1024)) -gt "$rss_max" ] && rss_max=$((unpack_rss / 1024))
  done
  med() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
  echo "  median pack/cp $(echo "$pr_all" | med), unpack/cp $(echo "$ur_all" | med); peak RSS $rss_max MiB; blob $(( $(stat -c %s "$work/b.klp1") >> 20 )) MiB"
done
rm -f "$work/random.img" "$work/cp.out"

echo "== 4. teleports, v2 against v1 (fs store and SeaweedFS), and the verified chunk download"
bash scripts/seaweedfs.sh start "$s3dir" >/dev/null
# shellcheck disable=SC1091
. "$s3dir/env"
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
export KELPIE_S3_ENDPOINT KELPIE_S3_BUCKET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION KELPIE_QEMU_TESTS=1
head -c $((256 * 1024 * 1024)) /dev/urandom > "$work/random256.img"
for img in first0.img random256.img; do
  echo "verified chunk download of $img"
  KELPIE_BENCH_IMAGE="$work/$img" go test -run '^$' -bench ChunkDownload -benchtime "${rounds}x" ./store/s3/ | grep -E 'Benchmark'
done
go test -run '^$' -bench CompactPackages -benchtime 3x -timeout 60m ./vm/qemu/ | grep -vE '^(goos|goarch|pkg|cpu):'
