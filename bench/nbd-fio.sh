#!/usr/bin/env bash
# fio against NBD servers on drives in tmpfs, in one run, with the peers interleaved job
# by job; prints the medians and the ratios that DESIGN §8 sets targets for:
#   atrest-enc    atrest's nbd server over blockcrypt (XTS-AES-256, random key) over the
#                 drive file: bench/cmd/plainserve -encrypt, a stand-in for `atrest serve`
#   atrest-plain  the same server code over the same drive file, unencrypted
#                 (bench/cmd/plainserve): enc/plain isolates the cost of encryption
#   nbdkit-file   `nbdkit file` over the same drive file
#   nbdkit-luks   `nbdkit file --filter=luks` over a LUKS image formatted by cryptsetup
#                 (aes-xts-plain64, 512-bit key); LUKS1 with 512-byte sectors, since
#                 nbdkit 1.32's luks filter refuses LUKS2 ("only supports LUKSv1")
# Targets: enc loses <= 3% read and <= 5% write against plain; enc beats nbdkit-file;
# enc >= 2.5x nbdkit-luks; 4 KiB random IOPS of enc >= nbdkit-file's.
#
# Jobs (bench/nbd/nbd.fio, ioengine=nbd, one connection): 1 MiB sequential read and write
# at depth 8, 4 KiB random read and write at depth 32.
#
# Environment: IMAGE_DIR=/dev/shm (tmpfs), SIZE=1G, RUNTIME=10 (seconds per job), REPS=3,
# PEERS="atrest-enc atrest-plain nbdkit-file nbdkit-luks", JSON_DIR (keep fio's JSON),
# ENC_URI (measure this export, e.g. `atrest serve`'s, as atrest-enc instead of
# plainserve -encrypt; it must be at least SIZE bytes).
# Needs fio, nbdkit (with the luks filter), cryptsetup, jq, Go.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

IMAGE_DIR=${IMAGE_DIR:-/dev/shm}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-3}
read -r -a PEERS <<<"${PEERS:-atrest-enc atrest-plain nbdkit-file nbdkit-luks}"
JOBS=(seqread-1m-qd8 seqwrite-1m-qd8 randread-4k-qd32 randwrite-4k-qd32)

. bench/lib.sh
for tool in fio nbdkit cryptsetup jq go; do
	command -v "$tool" >/dev/null || die "$tool is not installed (scripts/install-deps.sh)"
done

work=$(mktemp -d /tmp/atrest-nbd-bench.XXXXXX)
images=()
pids=()
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	rm -f "${images[@]}"
	save_json
	rm -rf "$work"
}
trap cleanup EXIT

echo "building bench/cmd/plainserve" >&2
go build -o "$work/plainserve" ./bench/cmd/plainserve

bytes=$(numfmt --from=iec "$SIZE")
echo "preparing the ${SIZE} drive and the LUKS image in $IMAGE_DIR" >&2
drive=$(mktemp "$IMAGE_DIR/atrest-nbd-bench.XXXXXX.img")
luks=$(mktemp "$IMAGE_DIR/atrest-nbd-bench-luks.XXXXXX.img")
images+=("$drive" "$luks")
# Real data everywhere, so that reads copy bytes instead of the zero pages of holes.
fio --name=fill --filename="$drive" --rw=write --bs=1M --size="$bytes" --ioengine=psync --output=/dev/null
keyfile=$work/passphrase
printf 'atrest-benchmark-passphrase' >"$keyfile"
truncate -s $((bytes + 16 * 1024 * 1024)) "$luks"
cryptsetup luksFormat --batch-mode --type luks1 --cipher aes-xts-plain64 --key-size 512 \
	--pbkdf-force-iterations 1000 --key-file "$keyfile" "$luks"
offset=$(cryptsetup luksDump "$luks" | awk '/^Payload offset:/ {print $3 * 512; exit}')
[ -n "$offset" ] || die "no payload offset in the LUKS header"
fio --name=fill --filename="$luks" --offset="$offset" --rw=write --bs=1M --size="$bytes" \
	--ioengine=psync --output=/dev/null

declare -A uris
start_plainserve() { # NAME FLAGS...
	local name=$1 sock=$work/$1.sock out=$work/$1.out
	shift
	"$work/plainserve" -listen "unix:$sock" "$@" "$drive" >"$out" 2>"$out.err" </dev/null &
	pids+=($!)
	wait_for grep -q '^ready' "$out"
	uris[$name]="nbd+unix:///?socket=$sock"
}
for peer in "${PEERS[@]}"; do
	case $peer in
	atrest-enc)
		if [ -n "${ENC_URI:-}" ]; then uris[$peer]=$ENC_URI; else start_plainserve "$peer" -encrypt; fi
		;;
	atrest-plain) start_plainserve "$peer" ;;
	nbdkit-file) start_nbdkit "$peer" file file="$drive" && uris[$peer]=$uri ;;
	nbdkit-luks) start_nbdkit "$peer" --filter=luks file file="$luks" passphrase=+"$keyfile" && uris[$peer]=$uri ;;
	*) die "unknown peer $peer" ;;
	esac
done

mkdir -p "$work/json"
run_job() { # PEER JOB REP
	local json=$work/json/$1.$2.$3.json
	# One retry: on a shared machine a run may be cut short (fio killed by a signal).
	URI=${uris[$1]} SIZE=$bytes RUNTIME=$RUNTIME fio --section="$2" --output-format=json bench/nbd/nbd.fio >"$json.raw" ||
		URI=${uris[$1]} SIZE=$bytes RUNTIME=$RUNTIME fio --section="$2" --output-format=json bench/nbd/nbd.fio >"$json.raw" ||
		die "fio $2 on $1 failed twice"
	fio_json "$json.raw" "$json" "$2 on $1"
	rm -f "$json.raw"
}

for job in "${JOBS[@]}"; do
	for rep in $(seq "$REPS"); do
		# Rotate the order so that no peer always runs first or last.
		order=("${PEERS[@]:$((rep % ${#PEERS[@]}))}" "${PEERS[@]:0:$((rep % ${#PEERS[@]}))}")
		for peer in "${order[@]}"; do
			echo "$job on $peer, run $rep/$REPS" >&2
			run_job "$peer" "$job" "$rep"
		done
	done
done

have() { [[ " ${PEERS[*]} " == *" $1 "* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}'; }
printf '\nNBD, fio ioengine=nbd, drives in %s (%s), %ss per run, median of %s\n' "$IMAGE_DIR" "$SIZE" "$RUNTIME" "$REPS"
printf '%-18s' job
for peer in "${PEERS[@]}"; do printf ' %15s' "$peer"; done
have atrest-enc && have atrest-plain && printf ' %10s' enc/plain
have atrest-enc && have nbdkit-file && printf ' %10s' enc/kit
have atrest-enc && have nbdkit-luks && printf ' %10s' enc/luks
have atrest-plain && have nbdkit-file && printf ' %10s' plain/kit
printf '\n'
for job in "${JOBS[@]}"; do
	fio_metric "$job"
	declare -A v=()
	printf '%-18s' "$job"
	for peer in "${PEERS[@]}"; do
		v[$peer]=$(median "$peer" "$job" "$field")
		printf ' %10.0f %-4s' "${v[$peer]}" "$unit"
	done
	have atrest-enc && have atrest-plain && printf ' %10s' "$(ratio "${v[atrest-enc]}" "${v[atrest-plain]}")"
	have atrest-enc && have nbdkit-file && printf ' %10s' "$(ratio "${v[atrest-enc]}" "${v[nbdkit-file]}")"
	have atrest-enc && have nbdkit-luks && printf ' %10s' "$(ratio "${v[atrest-enc]}" "${v[nbdkit-luks]}")"
	have atrest-plain && have nbdkit-file && printf ' %10s' "$(ratio "${v[atrest-plain]}" "${v[nbdkit-file]}")"
	printf '\n'
	unset v
done
