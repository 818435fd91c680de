#!/usr/bin/env bash
# atrest's benchmark, in one command: builds bench/cmd/benchrun and runs it (see its doc
# comment for what it measures and writes):
#
#   bench/run.sh            full run (about 25 minutes on 2 cores): docs/bench/ and README.md
#   bench/run.sh --quick    shorter (about 8 minutes): the same files
#   bench/run.sh --smoke    one short run per peer (under a minute), report in a scratch directory
#   bench/run.sh --hold     set the stacks up and wait for Ctrl-C (for profiling)
#
# Other flags go to benchrun (bench/run.sh -help lists them). Needs root and the tools of
# scripts/install-deps.sh. Ctrl-C stops it cleanly: benchrun takes every stack down; should
# benchrun itself be killed, the trap below sweeps what it left (mounts, loop devices,
# processes, images), found by its work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

work=$(mktemp -d /tmp/atrest-bench.XXXXXX)
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -x "$work/benchrun" ]; then
		"$work/benchrun" -sweep "$work" || rc=1
	fi
	rm -rf "$work"
	exit "$rc"
}
trap cleanup EXIT
# A signal while benchrun runs reaches it too and it stops by itself; the shell waits,
# then the EXIT trap runs.
trap 'exit 130' INT TERM

go build -o "$work/benchrun" ./bench/cmd/benchrun
BENCH_PROGRAM=bench/run.sh "$work/benchrun" -work "$work" "$@"
