#!/usr/bin/env bash
# Prepare this machine to run Kelpie guests: install QEMU (TCG is used; no
# KVM needed) and the tools scripts/build-image.sh needs, then build (or
# reuse from cache) the guest image. Idempotent; fast when all is in place.
# Needs root (apt-get) unless everything is already installed.
# The last line printed is the image directory (see build-image.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
for t in cpio:cpio gzip:gzip lz4:lz4 dpkg-deb:dpkg flock:util-linux mkfs.ext4:e2fsprogs; do
	command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done

if ((${#need[@]})); then
	[[ $(id -u) == 0 ]] || { echo "setup-qemu: need root to install: ${need[*]}" >&2; exit 1; }
	echo "setup-qemu: installing ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	# Update the lists first when empty; retry once after an update if
	# the install fails on stale lists.
	compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt-get update -qq >/dev/null
	if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
		apt-get update -qq >/dev/null
		apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi
fi

exec "$ROOT/scripts/build-image.sh"
