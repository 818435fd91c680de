// Package exitcodes lists the exit codes of the atrest command, in one place, so that
// scripts and systemd units can rely on them. The numbers never change meaning.
package exitcodes

const (
	// OK: the command did what it was asked.
	OK = 0
	// Failure: an error not covered by a more specific code.
	Failure = 1
	// Usage: the command line was wrong (unknown flag, missing argument, bad value).
	Usage = 2
	// Keystore: the boot-drive keystore is missing, unsafe (owner, mode, symlink) or corrupt.
	Keystore = 3
	// Header: a drive's LUKS2 header is damaged beyond repair, or refused by validation.
	Header = 4
	// Key: a key does not open a drive (wrong master key, wrong key file).
	Key = 5
	// Busy: another atrest process holds the keystore lock, or a target is in use.
	Busy = 6
	// DriveMissing: a drive the command needs is absent.
	DriveMissing = 7
	// IO: a drive or the network failed while the command ran.
	IO = 8
	// Exists: the command would overwrite something that already exists (a keystore,
	// a header, a file system) and was not forced.
	Exists = 9
)
