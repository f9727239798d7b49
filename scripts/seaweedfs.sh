#!/usr/bin/env bash
# Build and run a local SeaweedFS S3 server for Kelpie's integration tests.
#
#   scripts/seaweedfs.sh build        build (or reuse) the pinned `weed` binary, print its path
#   scripts/seaweedfs.sh start DIR    start `weed mini` on free loopback ports, data/logs in DIR,
#                                     write DIR/env (source it), create the test bucket
#   scripts/seaweedfs.sh stop DIR     stop the server started in DIR and wait for it to exit
#
# The binary is pinned by tools/seaweedfs/go.mod (a wrapper module kept apart
# from the project's go.mod because SeaweedFS's go.mod has a replace directive)
# and cached in ${KELPIE_CACHE:-$HOME/.cache/kelpie}/bin/weed. A cold build
# takes ~5-10 minutes and ~2.2 GB RAM on 2 cores (plus ~1 min of module
# downloads on a machine without them); with Go's build cache ~10 s.
#
# Everything listens on 127.0.0.1 only. Telemetry is switched off.
#
# Environment knobs:
#   KELPIE_CACHE            cache root (default $HOME/.cache/kelpie)
#   KELPIE_S3_BUCKET        bucket created by `start` (default kelpie-test)
#   KELPIE_S3_START_TIMEOUT seconds to wait for S3 readiness (default 60)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODDIR="$ROOT/tools/seaweedfs"
CACHE="${KELPIE_CACHE:-$HOME/.cache/kelpie}"
BIN="$CACHE/bin/weed"
STAMP="$CACHE/bin/weed.stamp"

ACCESS_KEY=kelpie-test
SECRET_KEY=kelpie-test-secret
REGION=us-east-1
BUCKET="${KELPIE_S3_BUCKET:-kelpie-test}"
START_TIMEOUT="${KELPIE_S3_START_TIMEOUT:-60}"

die() { echo "seaweedfs.sh: $*" >&2; exit 1; }
log() { echo "seaweedfs.sh: $*" >&2; }

# The pinned SeaweedFS version plus a hash of the wrapper module files, so a
# change of version (or of the replace directive / go.sum) triggers a rebuild.
wanted_stamp() {
	local ver sum
	ver=$(awk '$1 == "github.com/seaweedfs/seaweedfs" { print $2; exit }
	           $1 == "require" && $2 == "github.com/seaweedfs/seaweedfs" { print $3; exit }' "$MODDIR/go.mod")
	[ -n "$ver" ] || die "cannot find the seaweedfs version in $MODDIR/go.mod"
	sum=$(cat "$MODDIR/go.mod" "$MODDIR/go.sum" | sha256sum | cut -c1-16)
	echo "github.com/seaweedfs/seaweedfs $ver mod=$sum"
}

cmd_build() {
	command -v go >/dev/null || die "go is not on PATH"
	mkdir -p "$CACHE/bin"
	local want
	want=$(wanted_stamp)
	# Serialise concurrent builds (e.g. parallel test jobs).
	exec 9>"$CACHE/bin/.weed.lock"
	flock 9
	if [ -x "$BIN" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
		exec 9>&-
		echo "$BIN"
		return 0
	fi
	log "building weed ($want); a cold build takes 5-10 min"
	local tmp="$BIN.tmp.$$" start=$SECONDS
	# -mod=readonly: go.mod/go.sum are committed and complete; never rewrite them.
	# CGO_ENABLED=0: static binary, needs no C compiler; GOWORK=off: ignore any go.work.
	if ! (cd "$MODDIR" && GOWORK=off CGO_ENABLED=0 GOFLAGS='-mod=readonly -buildvcs=false' \
		go build -trimpath -ldflags='-s -w' -o "$tmp" github.com/seaweedfs/seaweedfs/weed); then
		rm -f "$tmp"
		die "go build of weed failed"
	fi
	mv -f "$tmp" "$BIN"
	echo "$want" >"$STAMP"
	exec 9>&-
	log "built $BIN in $((SECONDS - start)) s"
	echo "$BIN"
}

# Prints N distinct TCP ports that nothing listens on at 127.0.0.1, drawn from
# 20000-31999 (below Linux's ephemeral range, so outgoing connections made by
# the cluster itself cannot grab them before weed binds them).
free_ports() {
	local n=$1 p tries=0 out=()
	local listening
	listening=" $(ss -Hltn 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }' | tr '\n' ' ') "
	while [ ${#out[@]} -lt "$n" ]; do
		tries=$((tries + 1))
		[ $tries -lt 10000 ] || die "could not find $n free loopback ports"
		p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
		case " ${out[*]} " in *" $p "*) continue ;; esac
		case "$listening" in *" $p "*) continue ;; esac
		# Something answering on it (when ss is missing)?
		if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then continue; fi
		out+=("$p")
	done
	echo "${out[*]}"
}

s3_curl() { # s3_curl PORT METHOD PATH [curl args...]; prints the HTTP status
	local port=$1 method=$2 path=$3
	shift 3
	curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
		--aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
		-X "$method" "$@" "http://127.0.0.1:$port$path" || true
}

alive() { # alive PID: running, and not a zombie waiting to be reaped
	local st
	kill -0 "$1" 2>/dev/null || return 1
	st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
	[ -n "$st" ] && [ "$st" != Z ]
}

s3_ready() { # s3_ready PORT: prints "ready" once a signed ListBuckets succeeds, else the status
	local out
	out=$(curl -s -w '\n%{http_code}' --max-time 5 \
		--aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
		"http://127.0.0.1:$1/" 2>/dev/null) || true
	case "$out" in
	*ListAllMyBucketsResult*) echo ready ;;
	*) echo "${out##*$'\n'}" ;;
	esac
}

pid_is_ours() { # pid_is_ours PID DIR: the PID is a live weed whose -dir is DIR/data
	local pid=$1 dir=$2 cmdline
	[ -n "$pid" ] && alive "$pid" || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	case "$cmdline" in *" -dir=$dir/data "*) return 0 ;; esac
	return 1
}

show_logs() { # show_logs DIR: the tail of weed's console output and of its glog file
	local f
	for f in "$1/logs/weed.out" "$1/logs/weed.INFO"; do
		[ -s "$f" ] || continue
		echo "----- tail of $f" >&2
		tail -n 30 "$f" >&2 || true
	done
}

launch() { # launch DIR PORTS...; sets WEED_PID
	local dir=$1
	local master=$2 master_g=$3 volume=$4 volume_g=$5 filer=$6 filer_g=$7 s3=$8 s3_g=$9 admin=${10} admin_g=${11}
	# A clean environment: weed reads WEED_* / S3_* / AWS_* variables as
	# settings, and security.toml from the working directory and $HOME.
	(
		# Close every inherited descriptor but 0-2 (the build lock, a caller's
		# pipes), or weed would hold them open for as long as it runs.
		for fd in "/proc/$BASHPID"/fd/*; do
			fd=${fd##*/}
			if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
		done 2>/dev/null
		cd "$dir/data" && exec env -i PATH="/usr/bin:/bin" HOME="$dir" TMPDIR=/tmp \
			AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
			"$BIN" -logdir="$dir/logs" mini \
			-dir="$dir/data" \
			-ip=127.0.0.1 -ip.bind=127.0.0.1 \
			-master.port="$master" -master.port.grpc="$master_g" \
			-volume.port="$volume" -volume.port.grpc="$volume_g" \
			-filer.port="$filer" -filer.port.grpc="$filer_g" \
			-s3.port="$s3" -s3.port.grpc="$s3_g" \
			-admin.port="$admin" -admin.port.grpc="$admin_g" -admin.port.legacy=0 \
			-admin.ui=false -webdav=false \
			-s3.port.iceberg=0 -s3.port.lance=0 \
			-master.telemetry=false \
			>>"$dir/logs/weed.out" 2>&1 </dev/null
	) &
	WEED_PID=$!
}

cmd_start() {
	[ $# -eq 1 ] || die "usage: $0 start DIR"
	command -v curl >/dev/null || die "curl is not on PATH"
	mkdir -p "$1"
	local dir
	dir=$(cd "$1" && pwd)
	if [ -f "$dir/env" ]; then
		local old
		old=$(sed -n 's/.*WEED_PID=\([0-9]*\).*/\1/p' "$dir/env")
		if pid_is_ours "$old" "$dir"; then
			die "a server is already running for $dir (pid $old); run: $0 stop $dir"
		fi
		rm -f "$dir/env"
	fi
	cmd_build >/dev/null
	mkdir -p "$dir/data" "$dir/logs"

	local attempt ports s3 code t0 deadline logstart
	for attempt in 1 2 3; do
		read -r -a ports <<<"$(free_ports 10)"
		s3=${ports[6]}
		t0=$SECONDS
		touch "$dir/logs/weed.out"
		logstart=$(($(wc -l <"$dir/logs/weed.out") + 1))
		launch "$dir" "${ports[@]}"
		echo "${ports[*]}" >"$dir/ports"
		deadline=$((SECONDS + START_TIMEOUT))
		code=000
		while [ $SECONDS -lt $deadline ]; do
			if ! alive "$WEED_PID"; then
				code=died
				break
			fi
			# A signed ListBuckets answered by S3 means it is up and has loaded
			# the access key (any other listener on the port would not say so).
			code=$(s3_ready "$s3")
			[ "$code" = ready ] && alive "$WEED_PID" && break
			sleep 0.25
		done
		[ "$code" = ready ] && break
		if [ "$code" = died ] && [ $attempt -lt 3 ] &&
			tail -n "+$logstart" "$dir/logs/weed.out" | grep -q 'not available on\|address already in use'; then
			log "port clash, retrying with other ports"
			wait "$WEED_PID" 2>/dev/null || true
			continue
		fi
		log "S3 on 127.0.0.1:$s3 not ready after $((SECONDS - t0)) s (last status: $code); log tail:"
		show_logs "$dir"
		terminate "$WEED_PID"
		exit 1
	done
	log "S3 ready on 127.0.0.1:$s3 after $((SECONDS - t0)) s (pid $WEED_PID)"

	code=$(s3_curl "$s3" PUT "/$BUCKET")
	case "$code" in
	200 | 409) ;; # 409: already exists (restart on the same DIR)
	*)
		log "creating bucket $BUCKET answered HTTP $code; log tail:"
		show_logs "$dir"
		terminate "$WEED_PID"
		exit 1
		;;
	esac

	cat >"$dir/env" <<EOF
export KELPIE_S3_ENDPOINT=http://127.0.0.1:$s3 KELPIE_S3_BUCKET=$BUCKET AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY AWS_REGION=$REGION WEED_PID=$WEED_PID
EOF
	cat "$dir/env"
}

terminate() { # terminate PID: SIGTERM, wait up to 15 s, then SIGKILL
	local pid=$1 _
	kill -TERM "$pid" 2>/dev/null || return 0
	# Graceful shutdown normally takes about 3 s.
	for _ in $(seq 1 150); do
		alive "$pid" || break
		sleep 0.1
	done
	if alive "$pid"; then
		log "pid $pid still running after 15 s, killing"
		kill -KILL "$pid" 2>/dev/null || true
		for _ in $(seq 1 50); do
			alive "$pid" || break
			sleep 0.1
		done
	fi
	wait "$pid" 2>/dev/null || true # reaps it when it is our child
}

cmd_stop() {
	[ $# -eq 1 ] || die "usage: $0 stop DIR"
	[ -d "$1" ] || die "no such directory: $1"
	local dir pid p ports=()
	dir=$(cd "$1" && pwd)
	[ -f "$dir/env" ] || { log "nothing to stop in $dir (no env file)"; return 0; }
	pid=$(sed -n 's/.*WEED_PID=\([0-9]*\).*/\1/p' "$dir/env")
	if pid_is_ours "$pid" "$dir"; then
		terminate "$pid"
	fi
	# Unix sockets weed keeps in /tmp, named after its ports (left behind on
	# SIGKILL); skip a port that some other server has taken since.
	if [ -f "$dir/ports" ]; then
		read -r -a ports <"$dir/ports"
		for p in "${ports[@]}"; do
			[ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ] || continue
			rm -f /tmp/seaweedfs-*-"$p".sock
		done
	fi
	rm -f "$dir/env"
	log "stopped"
}

main() {
	case "${1:-}" in
	build) shift; cmd_build "$@" ;;
	start) shift; cmd_start "$@" ;;
	stop) shift; cmd_stop "$@" ;;
	*) echo "usage: $0 build | start DIR | stop DIR" >&2; exit 2 ;;
	esac
}

# One line, parsed whole before it runs: editing this file while a long build
# runs cannot make bash read on into the middle of the new text.
main "$@"; exit $?
