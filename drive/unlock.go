package drive

import (
	"errors"
	"fmt"
	"slices"
	"syscall"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// UnlockOptions configure Unlock and Check.
type UnlockOptions struct {
	// ClusterUUID is this cluster: the drive's atrest token must name it.
	ClusterUUID string
	// UUID, if set, is the drive expected: another one is ErrMissing.
	UUID string
	// Keys gives the master keys to try.
	Keys KeySource
	// ReadOnly opens the drive and the data device read-only.
	ReadOnly bool
	// Direct opens the drive with O_DIRECT.
	Direct bool
	// Exclusive holds the drive while it is unlocked (the daemon).
	Exclusive bool
}

// Unlocked is a drive opened with a master key: Device is its data segment, decrypted.
// Closing Device closes the drive.
type Unlocked struct {
	Info
	Device *blockcrypt.Device
	Path   string
	// KeyID is the master key that opened it.
	KeyID string
}

// unlockAttempts bounds Unlock's retries when a rotation in another process changes the
// header or the key files between its reads.
const unlockAttempts = 4

// Unlock opens the drive at path with a master key. It writes nothing (a damaged header
// copy is used read-only; the next writer repairs it), so it may run while a rotation
// rewraps the drive in another process: it tries each key of o.Keys, the one the token
// names first, on the keyslots the token names first, and when none opens it reads the
// keys and the header again. The drive must carry this cluster's token (else ErrForeign).
func Unlock(path string, o UnlockOptions) (*Unlocked, error) {
	dev, err := Open(path, OpenOptions{ReadOnly: o.ReadOnly, Direct: o.Direct, Exclusive: o.Exclusive})
	if err != nil {
		return nil, err
	}
	u, err := UnlockDevice(dev, path, o)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return u, nil
}

// UnlockDevice is Unlock on an open drive, which the returned Device then owns.
func UnlockDevice(dev blockdev.Device, path string, o UnlockOptions) (*Unlocked, error) {
	u, _, err := unlock(dev, path, o)
	return u, err
}

// unlock is UnlockDevice that also returns what it read of the header when it got that
// far (for Check's report of a drive no key opens).
func unlock(dev blockdev.Device, path string, o UnlockOptions) (*Unlocked, *Info, error) {
	var err error
	var in *Info
	for range unlockAttempts {
		var u *Unlocked
		u, in, err = tryUnlock(dev, path, o)
		if err == nil || !errors.Is(err, luks2.ErrWrongKey) {
			return u, in, err
		}
	}
	return nil, in, err
}

func tryUnlock(dev blockdev.Device, path string, o UnlockOptions) (*Unlocked, *Info, error) {
	h, err := luks2.Load(dev)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	if o.UUID != "" && h.UUID() != o.UUID {
		return nil, nil, fmt.Errorf("drive %s: %s holds drive %s instead: %w", o.UUID, path, h.UUID(), ErrMissing)
	}
	in, err := info(h)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: drive %s: %w: %w", path, h.UUID(), ErrForeign, err)
	}
	if in.Token == nil || in.Token.ClusterUUID != o.ClusterUUID {
		return nil, in, fmt.Errorf("%s: drive %s (this is cluster %s): %w", path, h.UUID(), o.ClusterUUID, ErrForeign)
	}
	keys, err := o.Keys()
	if err != nil {
		return nil, in, &keysError{err}
	}
	defer ZeroKeys(keys)
	// The key the token names first.
	slices.SortStableFunc(keys, func(a, b Key) int {
		if a.ID == in.Token.MasterKeyID {
			return -1
		}
		if b.ID == in.Token.MasterKeyID {
			return 1
		}
		return 0
	})
	slots := atrestSlots(h)
	var vk []byte
	keyID := ""
	err = luks2.ErrWrongKey
	for _, k := range keys {
		vk, _, err = h.UnlockAny(dev, slots, k.Key)
		if err == nil {
			keyID = k.ID
			break
		}
		if !errors.Is(err, luks2.ErrWrongKey) {
			// A keyslot that cannot be read, lies past the end of the drive or is
			// refused: no other key would do better, and the key is not to blame.
			return nil, in, fmt.Errorf("%s: drive %s: %w", path, h.UUID(), err)
		}
	}
	if vk == nil {
		return nil, in, fmt.Errorf("%s: the master key does not open drive %s: %w", path, h.UUID(), err)
	}
	defer clear(vk)
	cd, err := blockcrypt.New(dev, cryptConfig(h, vk, o.ReadOnly))
	if err != nil {
		return nil, in, fmt.Errorf("%s: %w", path, err)
	}
	return &Unlocked{Info: *in, Device: cd, Path: path, KeyID: keyID}, in, nil
}

// cryptConfig is the data segment of a header as blockcrypt takes it.
func cryptConfig(h *luks2.Header, vk []byte, readOnly bool) blockcrypt.Config {
	s := h.Segment()
	size := int64(0) // dynamic: to the end of the drive
	if s.Size >= 0 {
		size = s.Size
	}
	return blockcrypt.Config{
		Key: vk, Offset: s.Offset, Size: size, SectorSize: s.SectorSize, IVTweak: s.IVTweak,
		AllowDiscards: h.AllowDiscards(), ReadOnly: readOnly,
	}
}

// Drive states a Check reports (the words of docs/design.md). Whether a drive is stale,
// retired or being rotated is for the caller to say: it is in the registry and the
// rotation journal, not on the drive.
const (
	StatePresent  = "present"         // found, and a key opens it
	StateMissing  = "missing"         // the path does not exist, holds no LUKS2 header or holds another drive
	StateFailed   = "failed"          // the drive does not answer: an I/O error opening or reading it (a pulled drive behind a loop device, a dead disk)
	StateForeign  = "foreign"         // a LUKS2 drive without this cluster's token
	StateWrongKey = "wrong-key"       // this cluster's drive, but no key opens it
	StateDegraded = "header-degraded" // opens, but one header copy is damaged or stale
	StateDamaged  = "header-damaged"  // no valid header copy, one refused, or one larger than the drive
)

// Health is what Check found.
type Health struct {
	State string
	// KeyID is the master key that opens the drive, or, when none does, the one its
	// token names ("" when unknown).
	KeyID string
	// Detail says what was found, for people ("" when present).
	Detail string
	// Err is the error behind a state other than present and degraded.
	Err error
}

// keysError is a KeySource's error: about the keys, not the drive.
type keysError struct{ err error }

func (e *keysError) Error() string { return "read the master keys: " + e.err.Error() }
func (e *keysError) Unwrap() error { return e.err }

// Check looks at drive o.UUID at path for a status report: it runs Unlock on it,
// read-only and shared whatever o says, so that it reports present exactly when Unlock
// would succeed, and maps the outcome to a state. It takes a PBKDF2 derivation of 1000
// iterations per key tried. The error is o.Keys's: whatever is wrong with the drive is
// in the Health.
func Check(path string, o UnlockOptions) (Health, error) {
	o.ReadOnly, o.Direct, o.Exclusive = true, false, false
	dev, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		if isIOError(err) {
			return Health{State: StateFailed, Detail: err.Error(), Err: err}, nil
		}
		return Health{State: StateMissing, Detail: err.Error(), Err: err}, nil
	}
	u, in, err := unlock(dev, path, o)
	if err != nil {
		dev.Close()
		if ke := (*keysError)(nil); errors.As(err, &ke) {
			return Health{}, ke
		}
		return health(err, in), nil
	}
	defer u.Device.Close()
	if u.Degraded != nil {
		return Health{State: StateDegraded, KeyID: u.KeyID, Detail: u.Degraded.Error()}, nil
	}
	return Health{State: StatePresent, KeyID: u.KeyID}, nil
}

// health maps an error of unlock to a state.
func health(err error, in *Info) Health {
	h := Health{Detail: err.Error(), Err: err}
	if in != nil && in.Token != nil {
		h.KeyID = in.Token.MasterKeyID
	}
	switch {
	case errors.Is(err, ErrMissing), errors.Is(err, luks2.ErrNotLUKS):
		h.State = StateMissing
	case errors.Is(err, ErrForeign):
		h.State, h.KeyID = StateForeign, "" // another cluster's key id says nothing here
	case errors.Is(err, luks2.ErrWrongKey):
		h.State = StateWrongKey
	case errors.Is(err, luks2.ErrDamaged), errors.Is(err, luks2.ErrUnsupported), errors.Is(err, luks2.ErrTruncated),
		errors.Is(err, blockcrypt.ErrRegion), errors.Is(err, blockcrypt.ErrSectorSize):
		h.State = StateDamaged
	default:
		// luks2 returns the drive's own read errors as they are: it does not answer.
		h.State = StateFailed
	}
	return h
}

// isIOError reports whether opening a drive failed because the device is there but does
// not answer (pulled, powered off, or a loop device without a backing file).
func isIOError(err error) bool {
	return errors.Is(err, syscall.EIO) || errors.Is(err, syscall.ENXIO) || errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.ENOMEDIUM)
}
