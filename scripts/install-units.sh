#!/bin/sh
# Install atrest's systemd units (systemd/*.service) into /etc/systemd/system and tell
# a running systemd about them. Idempotent: files already up to date are left alone,
# and systemd is reloaded only when something changed. Enables nothing.
#
# Usage: scripts/install-units.sh [--root DIR] [--bindir DIR]
#   --root DIR    install under DIR instead of / (packaging, tests); never reloads systemd
#   --bindir DIR  directory of the atrest binary, written into ExecStart= and ExecStop=
#                 (default /usr/local/bin, where the units expect it)
set -eu

root=
bindir=/usr/local/bin
while [ $# -gt 0 ]; do
	case $1 in
	--root) root=${2:?--root needs a directory}; shift 2 ;;
	--bindir) bindir=${2:?--bindir needs a directory}; shift 2 ;;
	-h|--help) sed -n '2,10p' "$0"; exit 0 ;;
	*) echo "install-units.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done
case $bindir in
/*) ;;
*) echo "install-units.sh: --bindir must be an absolute path, not $bindir" >&2; exit 2 ;;
esac
case $bindir in
*'#'*|*'
'*) echo "install-units.sh: --bindir must not contain '#' or a newline" >&2; exit 2 ;;
esac

src=$(cd "$(dirname "$0")/../systemd" && pwd)
dest=$root/etc/systemd/system
mkdir -p "$dest"

changed=0
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for unit in "$src"/*.service; do
	name=$(basename "$unit")
	sed "s#/usr/local/bin/atrest#$bindir/atrest#g" "$unit" >"$tmp"
	if [ -f "$dest/$name" ] && cmp -s "$tmp" "$dest/$name"; then
		echo "unchanged: $dest/$name"
		continue
	fi
	install -m 0644 "$tmp" "$dest/$name"
	echo "installed: $dest/$name"
	changed=1
done

if [ ! -x "$root$bindir/atrest" ]; then
	echo "note: $root$bindir/atrest does not exist yet; install the binary there (go build -o $bindir/atrest ./cmd/atrest)"
fi

if [ -z "$root" ] && [ "$changed" = 1 ]; then
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload
		echo "systemd reloaded"
	else
		echo "systemd is not running here: nothing to reload"
	fi
fi
