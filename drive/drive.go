package drive

import (
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// Key is a master key and its public id (keystore.KeyID of the key).
type Key struct {
	ID  string
	Key []byte
}

// ZeroKeys clears the bytes of keys.
func ZeroKeys(keys []Key) {
	for _, k := range keys {
		clear(k.Key)
	}
}

// KeySource returns the master keys that may open a drive now (the current one, and
// during a rotation the next one too), which the caller zeroes. Unlock and Check call it
// again when no key opened a drive, so that a rotation finished meanwhile in another
// process is seen: it must read the keys afresh each time (keystore.Keystore.Keys does).
type KeySource func() ([]Key, error)

var (
	// ErrMissing: the drive is not where it was looked for: the path does not open,
	// holds no LUKS2 header, or holds another drive.
	ErrMissing = errors.New("drive is missing")
	// ErrForeign: the drive carries no atrest token of this cluster.
	ErrForeign = errors.New("drive is not a member of this cluster")
)

// OpenOptions configure Open.
type OpenOptions struct {
	// ReadOnly opens the drive for reading only.
	ReadOnly bool
	// Direct opens the drive with O_DIRECT (block devices and disk file systems).
	Direct bool
	// Exclusive holds the drive against other exclusive openers for as long as it is
	// open (blockdev.FileOptions.Exclusive): the daemon holds the drives it serves, and
	// format and adopt hold the drive they write, so that neither replaces a header
	// under the other, whichever keystore each uses. A drive another process holds
	// fails with blockdev.ErrInUse. A rotation opens shared: it only rewraps keyslots,
	// crash-safely, beside the daemon; a status only reads.
	Exclusive bool
}

// Open opens the drive at path. The operations of this package open drives through it,
// and so should every caller that reads or writes a drive's header or data.
func Open(path string, o OpenOptions) (*blockdev.File, error) {
	return blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: o.ReadOnly, Direct: o.Direct, Exclusive: o.Exclusive})
}

// Info is what a drive's header says, read without a key.
type Info struct {
	// UUID is the LUKS2 header's UUID, the drive's identity.
	UUID string
	// Token is the atrest token, nil if the drive carries none.
	Token *luks2.AtrestToken
	// SectorSize is the data segment's sector size: the natural block size to export.
	SectorSize int
	// AllowDiscards is the header's persistent allow-discards flag. What an unlocked
	// drive passes on is its Device's Caps (Trim: this flag and the drive's ability).
	AllowDiscards bool
	// Degraded says why a header copy is damaged or stale; nil when both are sound.
	// The next writer (under the custody lock) repairs it.
	Degraded error
}

// info reads the facts of a loaded header.
func info(h *luks2.Header) (*Info, error) {
	tok, err := h.AtrestToken()
	if err != nil {
		return nil, err
	}
	_, why := h.NeedsRepair()
	return &Info{UUID: h.UUID(), Token: tok, SectorSize: h.Segment().SectorSize, AllowDiscards: h.AllowDiscards(), Degraded: why}, nil
}

// Inspect reads the header of the drive dev (at path, named in errors) without a key. A
// drive without a LUKS2 header gives an error wrapping luks2.ErrNotLUKS.
func Inspect(dev io.ReaderAt, path string) (*Info, error) {
	h, err := luks2.Load(dev)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	in, err := info(h)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return in, nil
}

// Probe checks that drive uuid is at path: a LUKS2 header with that UUID. When the path
// does not open, holds no LUKS2 header or holds another drive, the error wraps
// ErrMissing; other errors (a header that does not load) are returned as they are.
func Probe(path, uuid string) error {
	dev, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("drive %s at %s: %v: %w", uuid, path, err, ErrMissing)
	}
	defer dev.Close()
	h, err := luks2.Load(dev)
	if err != nil {
		if errors.Is(err, luks2.ErrNotLUKS) {
			return fmt.Errorf("drive %s at %s: %v: %w", uuid, path, err, ErrMissing)
		}
		return fmt.Errorf("drive %s at %s: %w", uuid, path, err)
	}
	if h.UUID() != uuid {
		return fmt.Errorf("drive %s: %s holds drive %s instead: %w", uuid, path, h.UUID(), ErrMissing)
	}
	return nil
}

// loadHeader loads a drive's header; when repair is set (a writer, under the custody
// lock), a damaged or stale copy is rewritten from the good one.
func loadHeader(dev luks2.Device, path string, repair bool) (*luks2.Header, error) {
	h, err := luks2.Load(dev)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if bad, _ := h.NeedsRepair(); bad && repair {
		if err := h.Repair(dev); err != nil {
			return nil, fmt.Errorf("%s: repair the header: %w", path, err)
		}
	}
	return h, nil
}

// atrestSlots orders the slots to try with a master key: those the atrest token names,
// then the other PBKDF2 slots (atrest writes only those; the Argon2 slots of an adopted
// drive's old passphrase would cost seconds each for nothing).
func atrestSlots(h *luks2.Header) []int {
	var first, rest []int
	if t, err := h.AtrestToken(); err == nil && t != nil {
		first = t.Keyslots
	}
	for _, ks := range h.Keyslots() {
		if ks.KDF.Type == "pbkdf2" && !slices.Contains(first, ks.ID) {
			rest = append(rest, ks.ID)
		}
	}
	return append(slices.Clone(first), rest...)
}
