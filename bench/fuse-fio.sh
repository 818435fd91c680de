#!/usr/bin/env bash
# fio on atrest's FUSE file (fusefs) against nbdfuse on the same drive, in one run, with
# the two peers interleaved job by job; prints the medians and the ratio fusefs/nbdfuse.
#
# Jobs (bench/fuse/fuse.fio): direct I/O, 1 MiB sequential read and write at depth 8,
# 4 KiB random read and write at depth 32.
#
# MODE=nbd (the default): both peers are NBD clients of the same server: fusefs over
#   atrest's NBD client (bench/fuse/fuseserve -nbd) against nbdfuse. The server is
#   `nbdkit file` on a unix socket over an image that this script makes, or the export
#   NBD_URI if given (e.g. `atrest serve --shared-writers`'s
#   nbd+unix:///vol1?socket=/run/atrest/nbd.sock: without --shared-writers the daemon
#   lets one writer at a time in; the ext4 part then needs a second, NBD_URI2, since two
#   file systems cannot share one export).
# MODE=file: fusefs over a blockdev.File of the image against nbdfuse over `nbdkit file`
#   of the same image: nbdfuse pays an NBD hop that fusefs does not (the FUSE layer alone).
# MODE=atrest: the production stack. A keystore and three encrypted drives (SIZE each,
#   in IMAGE_DIR) served by `atrest serve --shared-writers` (the peers write to one
#   volume at once) on a unix socket. FUSE file: fusefs over
#   atrest's NBD client as `atrest mount` sets it up (bench/fuse/fuseserve -nbd, with
#   the client's defaults: replay log on) against nbdfuse, both on the same export, and
#   a third peer, fusefs-nolog, the same without the client's replay log (to measure its
#   cost). ext4: a file in the ext4 that `atrest mount` mounts on one drive against ext4
#   on a loop device (direct I/O) over nbdfuse on another.
#
# With EXT4=1 (default) it also runs the jobs on a file in ext4, mounted on a loop device
# (direct I/O) over each peer's FUSE file; each peer then has its own image.
#
# Environment: MODE (nbd, file, atrest), NBD_URI, NBD_URI2, IMAGE_DIR=/dev/shm (tmpfs: the drive costs nothing),
# SIZE=2G, EXT4_SIZE (fio file in ext4; 1G, or half of SIZE when that is less), RUNTIME=10 (seconds per job), REPS=3,
# IOENGINE=libaio, EXT4=1, JSON_DIR (keep fio's JSON output there).
# Needs root, fio, nbdkit, nbdfuse (libnbd-bin), fuse3, e2fsprogs, util-linux, jq, Go.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

MODE=${MODE:-nbd}
IMAGE_DIR=${IMAGE_DIR:-/dev/shm}
SIZE=${SIZE:-2G}
if [[ -z ${EXT4_SIZE:-} ]]; then
	# The file must fit in the ext4 of a SIZE volume (less the 16 MiB LUKS2 header).
	half=$(($(numfmt --from=iec "$SIZE") / 2))
	EXT4_SIZE=$((half < 1 << 30 ? half : 1 << 30))
fi
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-3}
IOENGINE=${IOENGINE:-libaio}
EXT4=${EXT4:-1}
JOBS=(seqread-1m-qd8 seqwrite-1m-qd8 randread-4k-qd32 randwrite-4k-qd32)

. bench/lib.sh
[ "$(id -u)" -eq 0 ] || die "needs root (FUSE mounts, loop devices)"
for tool in fio nbdkit nbdfuse nbdinfo fusermount3 losetup mkfs.ext4 dumpe2fs jq go; do
	command -v "$tool" >/dev/null || die "$tool is not installed (scripts/install-deps.sh)"
done
case $MODE in
file | nbd | atrest) ;;
*) die "unknown MODE=$MODE (nbd, file or atrest)" ;;
esac
if [ "$MODE" != nbd ] && [ -n "${NBD_URI:-}" ]; then
	die "NBD_URI is for MODE=nbd"
fi
if [ -n "${NBD_URI:-}" ] && [ "$EXT4" = 1 ] && [ -z "${NBD_URI2:-}" ]; then
	die "with NBD_URI, the ext4 part needs a second export NBD_URI2 (or EXT4=0)"
fi

work=$(mktemp -d /tmp/atrest-fuse-bench.XXXXXX)
images=()
pids=()
loops=()
mounts=()
cleanup() {
	set +e
	save_json
	if [ -x "$work/atrest" ] && mountpoint -q "$work/mnt-atrest"; then
		"$work/atrest" umount "$work/mnt-atrest"
	fi
	for m in "${mounts[@]}"; do umount "$m"; done
	for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null; done
	for d in "$work"/fusefs "$work"/nbdfuse "$work"/fusefs-ext4 "$work"/nbdfuse-ext4; do
		mountpoint -q "$d" && { fusermount3 -u "$d" || umount -l "$d"; }
	done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -f "${images[@]}"
	rm -rf "$work"
}
trap cleanup EXIT

echo "building bench/fuse/fuseserve" >&2
go build -o "$work/fuseserve" ./bench/fuse/fuseserve

# new_image: a filled image of SIZE bytes in IMAGE_DIR; sets $img to its path.
new_image() {
	img=$(mktemp "$IMAGE_DIR/atrest-fuse-bench.XXXXXX.img")
	images+=("$img")
	truncate -s "$SIZE" "$img"
	# Real data everywhere, so that reads copy bytes instead of zero pages of holes.
	fio --name=fill --filename="$img" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
		--output=/dev/null
}


# start_fusefs SOURCE DIR [FUSESERVE ARGS...]: serves SOURCE (an image in MODE=file, an
# NBD URI otherwise) as DIR/volume and sets $file to its path. (No command substitution
# around these: a background child would keep its pipe open.)
start_fusefs() {
	local out=$work/$(basename "$2").out src=-nbd
	[ "$MODE" = file ] && src=-image
	"$work/fuseserve" "$src" "$1" -dir "$2" "${@:3}" >"$out" 2>"$out.err" </dev/null &
	pids+=($!)
	wait_for grep -q '^ready ' "$out"
	file=$(sed -n 's/^ready //p' "$out")
}

# start_nbdfuse URI DIR: nbdfuse mounts the export URI as DIR/volume; sets $file.
start_nbdfuse() {
	local pidfile=$work/$(basename "$2").nbdfuse.pid
	mkdir -p "$2"
	nbdfuse -P "$pidfile" "$2/volume" "$1" </dev/null >/dev/null 2>"$pidfile.err" &
	pids+=($!)
	wait_for test -s "$pidfile"
	file=$2/volume
}

# ext4_on FILE MOUNTPOINT: loop device with direct I/O over FILE, fresh ext4, mounted.
ext4_on() {
	local loop
	loop=$(losetup --direct-io=on --find --show "$1" </dev/null)
	loops+=("$loop")
	mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$loop"
	mkdir -p "$2"
	mount -o noatime "$loop" "$2"
	mounts+=("$2")
}

# itable_zeroed DEV: ext4's lazy init has zeroed every group's inode table (it would
# compete with fio otherwise).
itable_zeroed() {
	local out
	out=$(dumpe2fs "$1" 2>/dev/null)
	[ "$(grep -c '^Group [0-9]*: ' <<<"$out")" = "$(grep -c 'ITABLE_ZEROED' <<<"$out")" ]
}

# run_job PEER JOB FILE SIZE REP: one fio run; its JSON goes to $work/json.
run_job() {
	local json=$work/json/$1.$2.$5.json
	mkdir -p "$work/json"
	FILE=$3 SIZE=$4 RUNTIME=$RUNTIME IOENGINE=$IOENGINE \
		fio --section="$2" --output-format=json bench/fuse/fuse.fio >"$json.raw" 2>"$json.err" || {
		local rc=$?
		tail -n 20 "$json.raw" "$json.err" "$work"/*.err >&2
		die "fio $2 on $1 failed (exit $rc)"
	}
	fio_json "$json.raw" "$json" "$2 on $1"
}

# measure LABEL SIZE PEER=FILE...: every job on every peer, REPS times, the peers'
# order rotated from one repetition to the next so that none always runs on a warmer
# machine; prints medians, with ratios to the second peer (the reference, nbdfuse).
measure() {
	local label=$1 size=$2
	shift 2
	local peers=() pf
	declare -A files
	for pf in "$@"; do
		peers+=("${pf%%=*}")
		files[${pf%%=*}]=${pf#*=}
	done
	local n=${#peers[@]}
	for job in "${JOBS[@]}"; do
		for rep in $(seq "$REPS"); do
			for k in $(seq 0 $((n - 1))); do
				local peer=${peers[$(((k + rep - 1) % n))]}
				echo "$label: $job on $peer, run $rep/$REPS" >&2
				run_job "$label-$peer" "$job" "${files[$peer]}" "$size" "$rep"
			done
		done
	done
	printf '\n%s (%s, %ss per run, median of %s, %s)\n' "$label" "$MODE" "$RUNTIME" "$REPS" "$IOENGINE"
	case $MODE in
	nbd) printf 'fusefs: atrest NBD client + fusefs; nbdfuse: libnbd + libfuse; one NBD server: %s\n' "${NBD_URI:-nbdkit file over an image in $IMAGE_DIR}" ;;
	file) printf 'fusefs: fusefs over a blockdev.File of the image; nbdfuse: over nbdkit file of the same image (one NBD hop more)\n' ;;
	atrest) printf 'NBD server: atrest serve (XTS-AES-256 drives in %s); fusefs: atrest NBD client + fusefs, as atrest mount; fusefs-nolog: without the replay log\n' "$IMAGE_DIR" ;;
	esac
	local ref=${peers[1]}
	printf '%-20s' job
	for p in "${peers[@]}"; do printf ' %14s' "$p"; done
	for p in "${peers[@]}"; do [ "$p" = "$ref" ] || printf ' %13s' "$p/$ref"; done
	printf '\n'
	for job in "${JOBS[@]}"; do
		local field unit
		fio_metric "$job"
		declare -A med=()
		for p in "${peers[@]}"; do med[$p]=$(median "$label-$p" "$job" "$field"); done
		printf '%-20s' "$job"
		for p in "${peers[@]}"; do printf ' %9.0f %-4s' "${med[$p]}" "$unit"; done
		for p in "${peers[@]}"; do
			[ "$p" = "$ref" ] || printf ' %12.2fx' "$(echo "${med[$p]} ${med[$ref]}" | awk '{print $1/$2}')"
		done
		printf '\n'
	done
}

if [ "$MODE" = atrest ]; then
	echo "building atrest; keystore and three ${SIZE} drives in $IMAGE_DIR" >&2
	go build -o "$work/atrest" ./cmd/atrest
	export ATREST_KEYSTORE=$work/keystore
	"$work/atrest" init >/dev/null
	for v in raw ext4a ext4n; do
		img=$IMAGE_DIR/atrest-fuse-bench-$v.$$.img
		images+=("$img")
		"$work/atrest" drive format --create "$SIZE" --volume "$v" "$img" >/dev/null
	done
	sock=$work/nbd.sock
	"$work/atrest" serve --shared-writers --listen "unix:$sock" "$IMAGE_DIR"/atrest-fuse-bench-*.$$.img \
		>"$work/serve.out" 2>"$work/serve.err" </dev/null &
	pids+=($!)
	wait_for grep -q '^atrest serve: serving' "$work/serve.err"
	raw="nbd+unix:///raw?socket=$sock"
	vsize=$(nbdinfo --size "$raw")
	# Written data everywhere, so that reads decrypt real ciphertext.
	fio --name=fill --ioengine=nbd --uri="$raw" --rw=write --bs=1M --iodepth=8 --size="$vsize" --output=/dev/null
	start_fusefs "$raw" "$work/fusefs"
	ffile=$file
	start_fusefs "$raw" "$work/fusefs-nolog" -replay-bytes -1
	lfile=$file
	start_nbdfuse "$raw" "$work/nbdfuse"
	nfile=$file
	measure "FUSE file" "$vsize" fusefs="$ffile" nbdfuse="$nfile" fusefs-nolog="$lfile" >"$work/results"
	if [ "$EXT4" = 1 ]; then
		fusermount3 -u "$work/fusefs"
		fusermount3 -u "$work/fusefs-nolog"
		fusermount3 -u "$work/nbdfuse"
		# atrest mount creates ext4 with lazy inode table init; init_itable=0 starts it
		# at once, and the runs wait for it, on both peers.
		"$work/atrest" mount --background -o noatime,init_itable=0 --nbd "nbd+unix:///ext4a?socket=$sock" "$work/mnt-atrest"
		aloop=$(jq -r .loop "/run/atrest/mounts/$(systemd-escape --path "$work/mnt-atrest").json")
		start_nbdfuse "nbd+unix:///ext4n?socket=$sock" "$work/nbdfuse-ext4"
		ext4_on "$file" "$work/mnt-nbdfuse"
		wait_for itable_zeroed "$aloop"
		measure "ext4 on loop on FUSE file" "$EXT4_SIZE" atrest-mount="$work/mnt-atrest/fio.dat" nbdfuse="$work/mnt-nbdfuse/fio.dat" >>"$work/results"
	fi
	cat "$work/results"
	exit 0
fi

if [ -n "${NBD_URI:-}" ]; then
	src=$NBD_URI
	nuri=$NBD_URI
else
	echo "preparing ${SIZE} image in $IMAGE_DIR" >&2
	new_image
	start_nbdkit raw file file="$img"
	nuri=$uri
	src=$img
	[ "$MODE" = nbd ] && src=$uri
fi
start_fusefs "$src" "$work/fusefs"
ffile=$file
start_nbdfuse "$nuri" "$work/nbdfuse"
nfile=$file
measure "FUSE file" "$SIZE" fusefs="$ffile" nbdfuse="$nfile" >"$work/results"

if [ "$EXT4" = 1 ]; then
	# Each file system needs its own drive; the raw peers let go of theirs first.
	fusermount3 -u "$work/fusefs"
	fusermount3 -u "$work/nbdfuse"
	if [ -n "${NBD_URI:-}" ]; then
		src=$NBD_URI
		nuri=$NBD_URI2
	else
		# fusefs goes on with the first image, through the same source as before.
		new_image
		start_nbdkit ext4-nbdfuse file file="$img"
		nuri=$uri
	fi
	start_fusefs "$src" "$work/fusefs-ext4"
	ffile=$file
	start_nbdfuse "$nuri" "$work/nbdfuse-ext4"
	nfile=$file
	ext4_on "$ffile" "$work/mnt-fusefs"
	ext4_on "$nfile" "$work/mnt-nbdfuse"
	measure "ext4 on loop on FUSE file" "$EXT4_SIZE" fusefs="$work/mnt-fusefs/fio.dat" nbdfuse="$work/mnt-nbdfuse/fio.dat" >>"$work/results"
fi

cat "$work/results"
