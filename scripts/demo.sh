#!/usr/bin/env bash
# The main job of atrest on built-in defaults, in a directory of its own:
#   1. install what is needed and build bin/atrest;
#   2. create a keystore (the "boot drive" part) in the demo directory;
#   3. create and format two sparse image drives;
#   4. serve them over NBD (atrest serve);
#   5. mount one through FUSE with ext4 on top (atrest mount) and write files;
#   6. show the encryption status, rotate the master key online, show it again;
#   7. prove that a known pattern written through the mount is nowhere on the drives.
#
# Usage: scripts/demo.sh [--cleanup] [--teardown] [DIR]
#   DIR          the demo directory (default /var/tmp/atrest-demo); a previous demo
#                there is torn down and replaced
#   --cleanup    tear everything down at the end instead of leaving it running
#   --teardown   only tear down a running demo in DIR
# Run as root: it attaches loop devices and mounts file systems.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PATH=/usr/local/go/bin:$PATH

cleanup=0
teardown_only=0
dir=/var/tmp/atrest-demo
for arg in "$@"; do
	case "$arg" in
	--cleanup) cleanup=1 ;;
	--teardown) teardown_only=1 ;;
	-h | --help)
		sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	-*)
		echo "demo: unknown flag $arg" >&2
		exit 2
		;;
	*) dir=$arg ;;
	esac
done
case "$dir" in /*) ;; *) dir=$repo/$dir ;; esac

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: run as root (loop devices, FUSE and mounts need it)" >&2
	exit 1
fi

atrest=$repo/bin/atrest
keystore=$dir/keystore
socket=$dir/nbd.sock
mnt=$dir/mnt
export ATREST_KEYSTORE=$keystore
# The demo's daemon answers its control API here (not on the machine's
# /run/atrest/control.sock), and the demo's commands ask it there.
export ATREST_CONTROL=$dir/control.sock

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() {
	printf '$ %s\n' "$*"
	"$@"
}

# teardown undoes a demo in $dir, whatever state it is in; it is safe to run twice.
teardown() {
	[ -d "$dir" ] || return 0
	if [ -x "$atrest" ] && mountpoint -q "$mnt" 2>/dev/null; then
		"$atrest" umount "$mnt" || true
	elif [ -x "$atrest" ] && [ -d "$mnt" ]; then
		"$atrest" umount "$mnt" >/dev/null 2>&1 || true
	fi
	if [ -f "$dir/serve.pid" ]; then
		pid=$(cat "$dir/serve.pid")
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid"
			for _ in $(seq 100); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
		fi
	fi
	rm -rf "$dir"
}

if [ "$teardown_only" = 1 ]; then
	teardown
	echo "demo in $dir torn down"
	exit 0
fi

say "Installing dependencies and building atrest"
./scripts/install-deps.sh
mkdir -p bin
go build -o "$atrest" ./cmd/atrest
run "$atrest" version

teardown
mkdir -p "$dir/drives" "$mnt"
chmod 700 "$dir"

say "Creating the keystore (on a real node: /var/lib/atrest on the boot drive)"
run "$atrest" init

say "Formatting two sparse image drives (LUKS2 headers, data keys wrapped by the master key)"
run "$atrest" drive format --create 2G --volume data0 "$dir/drives/drive0.img"
run "$atrest" drive format --create 2G --volume data1 "$dir/drives/drive1.img"
run "$atrest" drive list

say "Serving the volumes over NBD"
printf '$ %s\n' "$atrest serve --listen unix:$socket $dir/drives/*.img &"
"$atrest" serve --listen "unix:$socket" "$dir"/drives/*.img >"$dir/serve.log" 2>&1 &
echo $! >"$dir/serve.pid"
# Readiness: the daemon logs "serving" only after it has read every export through its
# own socket (the same moment it tells systemd READY=1).
for _ in $(seq 300); do
	grep -q '^atrest serve: serving' "$dir/serve.log" && break
	kill -0 "$(cat "$dir/serve.pid")" 2>/dev/null || {
		cat "$dir/serve.log" >&2
		exit 1
	}
	sleep 0.1
done
grep -q '^atrest serve: serving' "$dir/serve.log" || {
	echo "demo: atrest serve did not become ready" >&2
	cat "$dir/serve.log" >&2
	exit 1
}
cat "$dir/serve.log"
run nbdinfo --list "nbd+unix:///?socket=$socket"

say "Mounting volume data0 through FUSE, with ext4 on top"
run "$atrest" mount --background --nbd "nbd+unix:///data0?socket=$socket" "$mnt"
run findmnt --target "$mnt"

say "Writing files through the mount"
marker="ATREST-DEMO-PLAINTEXT-$(date +%s)-"
printf '$ %s\n' "awk ... > $mnt/pattern.txt   # 200000 lines starting with $marker"
awk -v m="$marker" 'BEGIN { for (i = 0; i < 200000; i++) printf "%s%08d\n", m, i }' >"$mnt/pattern.txt"
run cp -r "$repo/blockcrypt" "$mnt/source-copy"
run sync
run df -h "$mnt"
run ls -la "$mnt"

say "Encryption status"
run "$atrest" encryption-status

say "Rotating the master key while the volume is mounted and served"
run "$atrest" rotate-encryption-keys
run "$atrest" encryption-status
run sha256sum "$mnt/pattern.txt"

say "Looking for the plaintext on the drives"
found_mount=$(grep -c -a -F "$marker" "$mnt/pattern.txt" || true)
echo "lines with the marker in the mounted file: $found_mount"
hits=0
for img in "$dir"/drives/*.img; do
	n=$(grep -c -a -F "$marker" "$img" || true)
	echo "lines with the marker on $(basename "$img"): $n"
	hits=$((hits + n))
done
if [ "$found_mount" -eq 0 ] || [ "$hits" -ne 0 ]; then
	echo "demo: FAILED: the marker must be in the mount and nowhere on the drives" >&2
	exit 1
fi
echo "The plaintext is in the mount and nowhere on the drives."

if [ "$cleanup" = 1 ]; then
	say "Tearing down"
	teardown
	echo "done"
else
	cat <<EOF

The demo is running in $dir:
  mount point  $mnt            (ext4 on FUSE on NBD on XTS-AES-256)
  NBD socket   $socket
  keystore     $keystore
  daemon log   $dir/serve.log
Try: ATREST_KEYSTORE=$keystore ATREST_CONTROL=$dir/control.sock $atrest encryption-status
Tear it down with: $0 --teardown $dir
EOF
fi
