#!/usr/bin/env bash
# Installs what atrest's demo and test suite need on a Debian machine with Go: the Debian
# packages of the peers the tests talk to, and the Go modules. Idempotent: it installs only
# what is missing, so a second run is quick. Run as root (or with sudo available).
set -euo pipefail

packages=(
	cryptsetup-bin       # LUKS2 interop: luksFormat, luksDump, open --test-passphrase
	curl                 # the control API from the shell (--unix-socket), as an administrator asks it
	e2fsprogs            # mkfs.ext4 on the mounted volumes
	fio                  # benchmarks and verification jobs (ioengine=nbd)
	fuse3                # fusermount3 for cleaning up FUSE mounts
	jq                   # the benchmark scripts read fio's JSON with it
	libnbd-bin           # nbdinfo, nbdcopy, nbdfuse
	mount                # mount, losetup (not Essential: a minimal image may lack it)
	nbdkit               # NBD peer (file plugin, luks filter)
	openssl              # peer for atrest speed
	python3-cryptography # independent AES-XTS oracle (Debian's /usr/bin/python3)
	qemu-utils           # qemu-nbd, qemu-io, qemu-img
	util-linux           # blkid, fstrim, mkswap
	systemd              # systemd-analyze verify of the shipped units
)

sudo=()
if [ "$(id -u)" -ne 0 ]; then
	sudo=(sudo)
fi

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	"${sudo[@]}" apt-get update -qq
	"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go: the toolchain is expected at /usr/local/go (Debian + Go machine); modules from the proxy.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
	export PATH=/usr/local/go/bin:$PATH
fi
command -v go >/dev/null 2>&1 || { echo "install-deps: go is not installed (need Go 1.26)" >&2; exit 1; }
cd "$(dirname "$0")/.."
go mod download
if [ -f blockcrypt/_asm/go.mod ]; then
	(cd blockcrypt/_asm && go mod download)
fi
