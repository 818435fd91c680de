# Helpers shared by the benchmark scripts (sourced, not run). The script sets $work
# (its scratch directory, with fio's JSON in $work/json) before it calls fio_json or
# median.

# die MESSAGE: fail the benchmark, naming the script.
die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# wait_for CHECK... : runs CHECK until it succeeds, for up to 30 s.
wait_for() {
	for _ in $(seq 300); do
		"$@" && return 0
		sleep 0.1
	done
	die "timed out waiting for: $*"
}

# fio_json RAW JSON WHAT: keeps fio's JSON output from RAW in JSON (fio may print lines
# before it, such as "fio: connected to NBD server": FIELD-NOTES), and fails if any job
# reported an error; WHAT names the run in the message.
fio_json() {
	sed -n '/^{/,$p' "$1" >"$2"
	local errs
	errs=$(jq '[.jobs[].error] | add' "$2")
	[ "$errs" = 0 ] || die "fio $3 reported errors ($errs)"
}

# median PEER JOB JQ: median over the repetitions of a jq expression of fio's JSON.
median() {
	for f in "$work"/json/"$1"."$2".*.json; do jq "$3" "$f"; done | sort -g |
		awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'
}

# fio_metric JOB: sets $field, the jq expression of fio's JSON that measures JOB, and
# $unit: MB/s for the sequential jobs, IOPS for the random ones.
fio_metric() {
	case $1 in
	seq*) field='[.jobs[].read.bw_bytes, .jobs[].write.bw_bytes] | add / 1e6' unit=MB/s ;;
	*) field='[.jobs[].read.iops, .jobs[].write.iops] | add' unit=IOPS ;;
	esac
}

# start_nbdkit NAME ARGS...: nbdkit serves ARGS (a plugin, its filters and parameters)
# on the unix socket $work/NAME.sock; its pid joins $pids; sets $uri.
start_nbdkit() {
	local sock=$work/$1.sock pidfile=$work/$1.nbdkit.pid
	shift
	nbdkit --unix "$sock" --pidfile "$pidfile" "$@" </dev/null >/dev/null 2>"$pidfile.err"
	wait_for test -s "$pidfile"
	pids+=("$(cat "$pidfile")")
	uri="nbd+unix:///?socket=$sock"
}

# save_json: copies fio's JSON output to $JSON_DIR, if set (from the cleanup, so that
# the runs of a failed benchmark are kept too).
save_json() {
	[ -n "${JSON_DIR:-}" ] && compgen -G "$work/json/*.json" >/dev/null || return 0
	mkdir -p "$JSON_DIR" && cp "$work"/json/*.json "$JSON_DIR"/
}
