// Package systemd holds atrest's systemd units, atrest.service (the daemon) and
// atrest-mount@.service (one mounted volume per instance), which
// scripts/install-units.sh installs. The package has no code; its tests install the
// units into a temporary root and check them with systemd-analyze.
package systemd
