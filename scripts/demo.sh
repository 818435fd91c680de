#!/usr/bin/env bash
# The main job of atrest on built-in defaults. For now: build atrest and measure the XTS
# implementations against OpenSSL on this machine (atrest speed). It grows into the full
# demo cluster (init, format, serve, mount, write, status) as those commands land.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
./scripts/install-deps.sh
mkdir -p bin
go build -o bin/atrest ./cmd/atrest
./bin/atrest version
./bin/atrest speed
