package keystore

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/securefile"
)

// File names inside the keystore directory. The registry keeps its own files in the same
// directory (registry.FileName, registry.LockFileName).
const (
	MasterKeyFile = "master.key"
	NextKeyFile   = "master.key.next"
	StateFile     = "keystore.json"
	LockFile      = "lock"
)

// MasterKeySize is the size of the master key: 32 random bytes, used as the passphrase
// (cryptsetup --key-file) of each drive's atrest keyslot.
const MasterKeySize = 32

var (
	// ErrUnsafe: a keystore file or the directory is a symlink, not a regular file (or
	// directory), owned by someone else, or open to group or others. The error is a
	// *securefile.UnsafeError, whose Fix says what to do.
	ErrUnsafe = securefile.ErrUnsafe
	// ErrBusy: another process holds the custody lock.
	ErrBusy = securefile.ErrBusy
	// ErrCorrupt: a keystore file does not parse or contradicts itself. A keystore
	// that does not load is never rewritten.
	ErrCorrupt = errors.New("corrupt keystore")
	// ErrNoKeystore: the directory has no keystore.
	ErrNoKeystore = errors.New("no keystore")
	// ErrExists: Init found a keystore (or part of one) already there.
	ErrExists = errors.New("keystore already exists")
	// ErrStrayKey: Init found a master.key without keystore.json (an init interrupted
	// between its two writes) that is not a master key.
	ErrStrayKey = errors.New("a master.key without keystore.json, left by an interrupted init?")
	// ErrRotationUnderWay: a change that needs the master key (format, adopt) while the
	// rotation journal records a rotation; finishing the rotation (Rotate) clears it.
	ErrRotationUnderWay = errors.New("a master key rotation is under way")
	// ErrNotMigrated: a change to a keystore.json of version 1, which MigrateV1 must
	// migrate first.
	ErrNotMigrated = errors.New("keystore.json is version 1 and not migrated yet")
	// ErrDriveMissing: a drive a rotation needs is not at its path (see MissingError).
	ErrDriveMissing = drive.ErrMissing
	// errClosed: a Locked used after Close.
	errClosed = errors.New("keystore: the custody lock was released (Locked used after Close)")
)

// maxKeyFileSize bounds the read of a key file: anything but MasterKeySize bytes is an
// error, but a longer file is reported with its size.
const maxKeyFileSize = 4096

// readKey reads a master key file: exactly MasterKeySize bytes.
func readKey(path string) ([]byte, error) {
	b, err := securefile.ReadFile(path, maxKeyFileSize)
	if errors.Is(err, securefile.ErrTooLarge) {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if err != nil {
		return nil, err
	}
	if len(b) != MasterKeySize {
		clear(b)
		return nil, fmt.Errorf("%s is %d bytes, not a %d-byte master key: %w", path, len(b), MasterKeySize, ErrCorrupt)
	}
	return b, nil
}

// KeyID is the public name of a master key: a truncated SHA-256 of the key under a
// domain prefix. It identifies the key in keystore.json, the registry, headers and
// status output without revealing anything usable about it.
func KeyID(key []byte) string {
	h := sha256.New()
	h.Write([]byte("atrest master key id v1\x00"))
	h.Write(key)
	return "mk-" + hex.EncodeToString(h.Sum(nil)[:8])
}

func newMasterKey() []byte {
	k := make([]byte, MasterKeySize)
	rand.Read(k)
	return k
}
