#!/usr/bin/env bash
# Runs atrest's whole test suite: installs what the tests need, then format, go.mod and vet checks,
# the tests (as root, with real loop devices, FUSE, cryptsetup, nbdkit, qemu, fio), a smoke
# run of the benchmark harness, the race detector on the concurrent packages, the pure-Go
# build tag, and every fuzz target briefly.
#
# Environment:
#   CI=true          a missing tool or missing root fails the run instead of skipping (set by .ci/run)
#   FUZZTIME=5s      how long each fuzz target runs
#   SKIP_INSTALL=1   do not run scripts/install-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

[ "${SKIP_INSTALL:-}" = 1 ] || ./scripts/install-deps.sh

fuzztime=${FUZZTIME:-5s}
start=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$*" "$(($(date +%s) - start))"; }

if [ "$(id -u)" -ne 0 ]; then
	if [ "${CI:-}" = true ]; then
		echo "test.sh: CI=true and not root: the integration tests need root (loop devices, FUSE, mounts)" >&2
		exit 1
	fi
	echo "test.sh: not root: tests that need root will be skipped" >&2
fi

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change:" >&2
	echo "$unformatted" >&2
	exit 1
fi

step "go mod tidy -diff"
# go.mod and go.sum must be what `go mod tidy` makes of them: every direct dependency
# listed as direct, nothing missing, nothing left over.
go mod tidy -diff

step "go vet"
go vet ./...
go vet -tags purego ./...
if [ -f blockcrypt/_asm/go.mod ]; then
	(cd blockcrypt/_asm && go vet ./...)
fi

step "go build"
go build ./...
GOARCH=arm64 go build ./...

step "go test"
go test -count=1 -timeout 20m ./...

# --- benchmark harness (bench/): not the benchmark itself, which takes too long for the
# suite, but one short fio run on every peer of every level, so that the harness cannot
# rot; it fails if anything is left behind (mounts, loop devices, processes, images).
step "benchmark smoke run (bench/run.sh --smoke)"
if [ "$(id -u)" -eq 0 ]; then
	bench/run.sh --smoke
else
	echo "test.sh: not root: the benchmark smoke run is skipped" >&2
fi
# --- end of the benchmark step

step "go test -tags purego"
go test -count=1 -timeout 10m -tags purego ./blockcrypt/...

step "go test -race"
race_pkgs=()
for p in blockdev/... blockcrypt/... nbd/... fusefs/... volmount/... mountstack/... keystore/... drive/... luks2/... e2e/... discovery/... internal/drivebay/... node/... slot/...; do
	[ -d "${p%/...}" ] && race_pkgs+=("./$p")
done
go test -count=1 -timeout 20m -race "${race_pkgs[@]}"

step "fuzz targets (${fuzztime} each)"
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz $pkg $target"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" >/tmp/atrest-fuzz.log 2>&1 || {
			cat /tmp/atrest-fuzz.log >&2
			exit 1
		}
	done
done

step "all tests passed"
