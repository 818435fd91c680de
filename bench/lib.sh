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
