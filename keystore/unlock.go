package keystore

import (
	"errors"
	"fmt"
	"slices"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// UnlockOptions configure Unlock.
type UnlockOptions struct {
	// ReadOnly opens the drive and the data device read-only.
	ReadOnly bool
	// Direct opens the drive with O_DIRECT.
	Direct bool
	// Exclusive holds the drive while it is open (blockdev.FileOptions.Exclusive), so
	// that no format or adopt replaces its header under the daemon that serves it; a
	// drive another process holds fails with blockdev.ErrInUse.
	Exclusive bool
}

// UnlockedDrive is a drive opened with the master key: Device is its data segment,
// decrypted. Closing Device closes the drive. Whether the drive takes discards is in
// Device.Caps (the header's allow-discards flag and the drive's own ability).
type UnlockedDrive struct {
	Device      *blockcrypt.Device
	Path        string
	UUID        string // the LUKS2 header's UUID
	ClusterUUID string
	Volume      string
	VolumeUUID  string
	MemberIndex int
	MemberCount int
	SectorSize  int // data segment sector size: the natural block size to export
	KeyID       string
}

// unlockAttempts bounds Unlock's retries when a rotation in another process changes
// the header or the key files between its reads.
const unlockAttempts = 4

// Unlock opens the drive at path with the master key. It holds no lock and writes
// nothing (a damaged header copy is used read-only; the next changing command
// repairs it), so the daemon can call it while `atrest rotate-encryption-keys` runs
// in another process: it tries master.key and, during a rotation, master.key.next,
// each on the keyslots the atrest token names first, and reads everything again if
// a concurrent change made it miss. The drive must carry this cluster's token.
func (k *Keystore) Unlock(path string, o UnlockOptions) (*UnlockedDrive, error) {
	dev, err := blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: o.ReadOnly, Direct: o.Direct, Exclusive: o.Exclusive})
	if err != nil {
		return nil, err
	}
	u, err := k.UnlockDevice(dev, path, o)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return u, nil
}

// UnlockDevice is Unlock on an open device, which the returned Device then owns. How
// dev was opened (Direct, Exclusive) is the caller's choice; o.ReadOnly still applies to
// the returned Device.
func (k *Keystore) UnlockDevice(dev blockdev.Device, path string, o UnlockOptions) (*UnlockedDrive, error) {
	var lastErr error
	for range unlockAttempts {
		u, err := k.tryUnlock(dev, path, o)
		if err == nil || !errors.Is(err, luks2.ErrWrongKey) {
			return u, err
		}
		lastErr = err
		// A rotation may have replaced a key file or keyslot between the reads:
		// reload the state and try again.
		if s, err := Open(k.dir); err == nil {
			k = s
		}
	}
	return nil, lastErr
}

func (k *Keystore) tryUnlock(dev blockdev.Device, path string, o UnlockOptions) (*UnlockedDrive, error) {
	h, err := luks2.Load(dev)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	tok, err := h.AtrestToken()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if tok == nil || tok.ClusterUUID != k.state.ClusterUUID {
		return nil, fmt.Errorf("%s: drive %s (this is cluster %s): %w", path, h.UUID(), k.state.ClusterUUID, ErrForeign)
	}
	keys, err := k.masterKeys()
	if err != nil {
		return nil, err
	}
	defer zeroKeys(keys)
	// The key the token names first.
	slices.SortStableFunc(keys, func(a, b namedKey) int {
		if a.id == tok.MasterKeyID {
			return -1
		}
		if b.id == tok.MasterKeyID {
			return 1
		}
		return 0
	})
	slots := atrestSlots(h)
	var vk []byte
	var keyID string
	for _, nk := range keys {
		vk, _, err = h.UnlockAny(dev, slots, nk.key)
		if err == nil {
			keyID = nk.id
			break
		}
		if !errors.Is(err, luks2.ErrWrongKey) {
			// A keyslot that cannot be read or is refused: no key would do better.
			return nil, fmt.Errorf("%s: drive %s: %w", path, h.UUID(), err)
		}
	}
	if vk == nil {
		return nil, fmt.Errorf("%s: the master key does not open drive %s: %w", path, h.UUID(), err)
	}
	defer clear(vk)
	cfg := dataConfig(h)
	cfg.Key, cfg.ReadOnly = vk, o.ReadOnly
	cd, err := blockcrypt.New(dev, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &UnlockedDrive{
		Device: cd, Path: path, UUID: h.UUID(), ClusterUUID: tok.ClusterUUID,
		Volume: tok.Volume, VolumeUUID: tok.VolumeUUID,
		MemberIndex: tok.MemberIndex, MemberCount: tok.MemberCount,
		SectorSize: cfg.SectorSize, KeyID: keyID,
	}, nil
}
