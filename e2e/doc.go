// Package e2e holds the end-to-end tests of the atrest binary. It has no code of its
// own: the tests build cmd/atrest once per run, create a keystore and sparse drive
// images on tmpfs with `atrest init` and `atrest drive format`, run `atrest serve` as a
// child process under a fake systemd notify socket (readiness is its READY=1), and check
// what it serves with independent programs: nbdinfo, qemu-io, nbdcopy, fio, cryptsetup,
// python3-cryptography, systemd-socket-activate, and the project's own NBD client.
//
// The tests own every process and file they create and remove them even when they fail.
// Under `go test -race` the binary is built with -race too, so the daemon's own races
// show up as a failed exit status.
package e2e
