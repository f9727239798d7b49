#!/usr/bin/env bash
# Build the Kelpie guest image: kernel (Debian linux-image-cloud-amd64) plus
# an initramfs with busybox-static and the static kelpie-agent.
#
# Output (cached by a hash of all inputs):
#   ${KELPIE_CACHE:-$HOME/.cache/kelpie}/image/<VERSION>-<hash>/
#     vmlinux            uncompressed kernel, PVH entry (for -M microvm)
#     bzImage            Debian's vmlinuz as is (for -M pc)
#     initramfs.cpio.gz  busybox, kelpie-agent, modules, /etc
#     kelpie-forward     host-side relay QEMU runs per guest connection to a
#                        forwarded port (vm/qemu/cmd/kelpie-forward)
#     manifest.json      {version, kernel_version, arch, agent_sha256, built_at, ...}
#   ${KELPIE_CACHE:-$HOME/.cache/kelpie}/image/current -> <VERSION>-<hash>
# The last line printed is the output directory.
#
# Needs: apt-get, dpkg-deb, cpio, gzip, lz4, go (missing Debian tools are
# installed with apt-get when running as root). Idempotent; a cached run
# takes well under a second.
#
# Environment:
#   KELPIE_CACHE         cache root (default $HOME/.cache/kelpie)
#   KELPIE_KERNEL_PKG    kernel metapackage (default linux-image-cloud-amd64)
#   KELPIE_IMAGE_FORCE=1 rebuild even if cached
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMG_SRC="$ROOT/guest/image"
CACHE=${KELPIE_CACHE:-$HOME/.cache/kelpie}
IMAGES="$CACHE/image"
DEBS="$CACHE/debs"
KERNEL_META=${KELPIE_KERNEL_PKG:-linux-image-cloud-amd64}
BUSYBOX_PKG=busybox-static
ARCH=x86_64
VERSION=$(tr -d ' \n' <"$IMG_SRC/VERSION")

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $VERSION =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "bad version '$VERSION' in $IMG_SRC/VERSION"

GO=$(command -v go || true)
[[ -n $GO ]] || { [[ -x /usr/local/go/bin/go ]] && GO=/usr/local/go/bin/go; } || die "go toolchain not found"

# ensure_tools installs missing Debian tools (needs root).
ensure_tools() {
	local need=() t
	for t in cpio:cpio gzip:gzip lz4:lz4 dpkg-deb:dpkg apt-get:apt flock:util-linux sha256sum:coreutils; do
		command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
	done
	((${#need[@]})) || return 0
	[[ $(id -u) == 0 ]] || die "missing tools (${need[*]}); install them or run as root"
	log "installing ${need[*]}"
	apt_update_if_needed
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

apt_lists_empty() { ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }
apt_update_if_needed() {
	if apt_lists_empty; then
		log "apt-get update"
		apt-get update -qq >/dev/null
	fi
}

ensure_tools
apt_update_if_needed
mkdir -p "$IMAGES" "$DEBS"

# resolve_packages sets KERNEL_PKG (the versioned package the metapackage
# depends on), KERNEL_PKG_VER and BUSYBOX_VER from apt's candidates. apt-cache
# is slow (~1 s), so the answer is cached until the apt lists change.
resolve_packages() {
	local key cachef info
	key=$({
		echo "$KERNEL_META $BUSYBOX_PKG"
		ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null
	} | sha256sum | cut -c1-16)
	cachef="$IMAGES/.resolved-$key"
	if [[ -f $cachef ]]; then
		# shellcheck source=/dev/null
		source "$cachef"
		return 0
	fi
	info=$(apt-cache show --no-all-versions "$KERNEL_META" "$BUSYBOX_PKG" 2>/dev/null || true)
	read -r KERNEL_PKG KERNEL_PKG_VER < <(awk -v m="$KERNEL_META" '
		/^Package:/ {p=$2}
		p==m && /^Depends:/ && match($0, /linux-image-[0-9][^ ,]* \(= [^)]*\)/) {
			s=substr($0, RSTART, RLENGTH); gsub(/[()=]/, "", s); print s; exit
		}' <<<"$info") || true
	BUSYBOX_VER=$(awk -v b="$BUSYBOX_PKG" '/^Package:/ {p=$2} p==b && /^Version:/ {print $2; exit}' <<<"$info")
	[[ -n ${KERNEL_PKG:-} && -n ${KERNEL_PKG_VER:-} && -n ${BUSYBOX_VER:-} ]] || return 1
	rm -f "$IMAGES"/.resolved-*
	printf 'KERNEL_PKG=%q\nKERNEL_PKG_VER=%q\nBUSYBOX_VER=%q\n' "$KERNEL_PKG" "$KERNEL_PKG_VER" "$BUSYBOX_VER" >"$cachef"
}
if ! resolve_packages; then
	[[ $(id -u) == 0 ]] || die "cannot resolve $KERNEL_META / $BUSYBOX_PKG (run apt-get update)"
	log "apt-get update"
	apt-get update -qq >/dev/null
	resolve_packages || die "cannot resolve $KERNEL_META / $BUSYBOX_PKG from apt"
fi
KVER=${KERNEL_PKG#linux-image-}

# Hash every input: this script, the image files, the agent sources (stdlib
# only, so go.mod is left out), the Go toolchain and the package versions.
HASH=$(
	{
		echo "kernel $KERNEL_PKG $KERNEL_PKG_VER"
		echo "busybox $BUSYBOX_PKG $BUSYBOX_VER"
		"$GO" env GOVERSION
		cd "$ROOT"
		find scripts/build-image.sh guest/image/VERSION guest/image/modules.txt guest/image/rootfs \
			guest/agent vm/qemu/cmd/kelpie-forward -type f ! -name '*_test.go' ! -path '*/testdata/*' -print0 |
			LC_ALL=C sort -z | xargs -0 sha256sum
		find guest/image/rootfs -perm -u+x -type f | LC_ALL=C sort
	} | sha256sum | cut -c1-12
)
NAME="$VERSION-$HASH"
OUT="$IMAGES/$NAME"

set_current() {
	ln -sfn "$NAME" "$IMAGES/.current.$$"
	mv -T "$IMAGES/.current.$$" "$IMAGES/current"
}

if [[ -f $OUT/manifest.json && ${KELPIE_IMAGE_FORCE:-0} != 1 ]]; then
	set_current
	echo "$OUT"
	exit 0
fi

exec 9>"$IMAGES/.lock"
flock 9
if [[ -f $OUT/manifest.json && ${KELPIE_IMAGE_FORCE:-0} != 1 ]]; then # built meanwhile
	set_current
	echo "$OUT"
	exit 0
fi

log "building $NAME (kernel $KERNEL_PKG $KERNEL_PKG_VER, busybox $BUSYBOX_VER)"
WORK=$(mktemp -d "$IMAGES/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# fetch_deb PKG VERSION prints the path of the cached .deb, downloading it.
fetch_deb() {
	local pkg=$1 ver=$2 f
	f=$(compgen -G "$DEBS/${pkg}_*.deb" | while read -r c; do
		[[ $(dpkg-deb -f "$c" Version) == "$ver" ]] && echo "$c" && break
	done || true)
	if [[ -z $f ]]; then
		log "downloading $pkg=$ver"
		(cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null) ||
			die "apt-get download $pkg=$ver failed"
		f=$(compgen -G "$DEBS/${pkg}_*.deb" | while read -r c; do
			[[ $(dpkg-deb -f "$c" Version) == "$ver" ]] && echo "$c" && break
		done || true)
	fi
	[[ -n $f ]] || die "downloaded $pkg but cannot find its .deb"
	echo "$f"
}

KDEB=$(fetch_deb "$KERNEL_PKG" "$KERNEL_PKG_VER")
BDEB=$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VER")
mkdir -p "$WORK/kernel" "$WORK/busybox" "$WORK/out"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BDEB" "$WORK/busybox"

VMLINUZ="$WORK/kernel/boot/vmlinuz-$KVER"
MODDIR="$WORK/kernel/lib/modules/$KVER"
[[ -f $VMLINUZ ]] || die "no $VMLINUZ in $KDEB"
cp "$VMLINUZ" "$WORK/out/bzImage"

# Extract vmlinux like the kernel's scripts/extract-vmlinux: find the
# compressed payload by its magic and decompress until a valid ELF results.
is_elf() { [[ -s $1 && $(head -c4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]; }
extract_vmlinux() {
	local in=$1 out=$2 magic cmd pos
	for spec in '\x02\x21\x4c\x18|lz4 -dc' '\x1f\x8b\x08|gzip -dc' '\xfd\x37\x7a\x58\x5a\x00|xz -dc' \
		'\x28\xb5\x2f\xfd|zstd -dc' '\x89\x4c\x5a|lzop -dc' '\x5d\x00\x00\x00|unlzma -c' 'BZh|bzip2 -dc'; do
		magic=${spec%%|*} cmd=${spec#*|}
		command -v "${cmd%% *}" >/dev/null 2>&1 || continue
		for pos in $(LC_ALL=C grep -obUaP "$magic" "$in" 2>/dev/null | cut -d: -f1 | head -5); do
			# Trailing data after the stream makes decompressors fail: ignore
			# the status and check the result.
			tail -c+$((pos + 1)) "$in" | $cmd >"$out" 2>/dev/null || true
			if is_elf "$out"; then
				return 0
			fi
		done
	done
	return 1
}
extract_vmlinux "$VMLINUZ" "$WORK/out/vmlinux" || die "cannot extract vmlinux from $VMLINUZ"
# PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) is needed for -M microvm; check the
# note name "Xen" exists (readelf may be absent on a bare machine).
LC_ALL=C grep -qaF 'Xen' "$WORK/out/vmlinux" || die "vmlinux has no Xen/PVH ELF notes"

# --- initramfs tree ---
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/kelpie,lib/modules/kelpie,proc,sys,dev,tmp,run,workspace,root,mnt,var/tmp}
chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 0700 "$R/root"
install -m 0755 "$WORK/busybox/bin/busybox" "$R/bin/busybox"
# busybox --install -s, done from the host: one symlink per applet.
"$R/bin/busybox" --list-full | while read -r applet; do
	[[ -e $R/$applet || -L $R/$applet ]] && continue
	mkdir -p "$R/$(dirname "$applet")"
	ln -s /bin/busybox "$R/$applet"
done
ln -sfn /bin/busybox "$R/init"

log "building kelpie-agent"
(cd "$ROOT" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$GO" build -trimpath -ldflags='-s -w -buildid=' \
	-o "$R/sbin/kelpie-agent" ./guest/agent/cmd/kelpie-agent)
AGENT_SHA=$(sha256sum "$R/sbin/kelpie-agent" | cut -d' ' -f1)
log "building kelpie-forward"
(cd "$ROOT" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags='-s -w -buildid=' \
	-o "$WORK/out/kelpie-forward" ./vm/qemu/cmd/kelpie-forward)

cp -a "$IMG_SRC/rootfs/." "$R/"
chmod 0755 "$R/etc/init.d/rcS"
echo "$VERSION" >"$R/etc/kelpie-image-version"

# Kernel modules: resolve dependencies from each module's depends= field
# (the .deb ships no modules.dep) and record the load order.
declare -A MODPATH
while IFS= read -r -d '' f; do
	n=$(basename "$f" .ko)
	MODPATH[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko' -print0)
declare -A LOADED
ORDER=()
add_module() {
	local m=${1//-/_} dep deps
	[[ -n ${LOADED[$m]:-} ]] && return 0
	# Built-in modules need no loading.
	if [[ -z ${MODPATH[$m]:-} ]]; then
		grep -qE "/${m//_/[-_]}\.ko$" "$MODDIR/modules.builtin" && return 0
		die "module $m not found in $KERNEL_PKG"
	fi
	LOADED[$m]=visiting
	deps=$(tr '\0' '\n' <"${MODPATH[$m]}" | sed -n 's/^depends=//p' | head -1)
	for dep in ${deps//,/ }; do
		[[ ${LOADED[${dep//-/_}]:-} == visiting ]] && die "module dependency cycle at $dep"
		add_module "$dep"
	done
	LOADED[$m]=loaded
	ORDER+=("$m")
}
while read -r m; do
	m=${m%%#*}
	m=${m//[[:space:]]/}
	[[ -n $m ]] && add_module "$m"
done <"$IMG_SRC/modules.txt"
: >"$R/etc/kelpie/modules"
for m in "${ORDER[@]}"; do
	cp "${MODPATH[$m]}" "$R/lib/modules/kelpie/$m.ko"
	echo "$m" >>"$R/etc/kelpie/modules"
done

# Device nodes the kernel needs before devtmpfs is mounted.
if [[ $(id -u) == 0 ]]; then
	mknod -m 0600 "$R/dev/console" c 5 1
	mknod -m 0666 "$R/dev/null" c 1 3
else
	log "warning: not root, initramfs has no /dev/console (no early console output)"
fi

# Fixed mtimes and sorted names: the same inputs give a byte-identical archive.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null --quiet -o -H newc --owner=0:0 --reproducible) | gzip -n -6 >"$WORK/out/initramfs.cpio.gz"

MODULES_JSON=$(printf '"%s",' "${ORDER[@]}")
cat >"$WORK/out/manifest.json" <<EOF
{
  "version": "$VERSION",
  "kernel_version": "$KVER",
  "arch": "$ARCH",
  "agent_sha256": "$AGENT_SHA",
  "initramfs_sha256": "$(sha256sum "$WORK/out/initramfs.cpio.gz" | cut -d' ' -f1)",
  "agent_version": "$("$R/sbin/kelpie-agent" -version)",
  "forward_sha256": "$(sha256sum "$WORK/out/kelpie-forward" | cut -d' ' -f1)",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "inputs_hash": "$HASH",
  "kernel_package": "$KERNEL_PKG=$KERNEL_PKG_VER",
  "busybox_package": "$BUSYBOX_PKG=$BUSYBOX_VER",
  "modules": [${MODULES_JSON%,}]
}
EOF

rm -rf "$OUT"
mv -T "$WORK/out" "$OUT"
set_current
log "done: $(du -sh "$OUT" | cut -f1)"
echo "$OUT"
