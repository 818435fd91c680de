package drive

import (
	"bytes"
	"crypto/rand"
	"fmt"

	"github.com/google/uuid"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// FormatOptions configure Format.
type FormatOptions struct {
	// Key is the master key that wraps the new data key.
	Key Key
	// Token is the drive's place in the cluster (cluster, volume name and UUID, member
	// index and count); Format sets its keyslots and master key id.
	Token luks2.AtrestToken
	// UUID is the drive's LUKS2 UUID; "" picks a random one.
	UUID string
	// SectorSize is the data sector size: 4096 (default) or 512.
	SectorSize int
	// AllowDiscards sets the header's persistent allow-discards flag.
	AllowDiscards bool
	// Wipe, if set, is called once the header is written, with the data segment opened
	// for writing, to fill it (the caller shows progress).
	Wipe func(dev *blockcrypt.Device) error
}

// Format writes a LUKS2 header to the drive dev (at path, named in errors) with a new
// random data key wrapped by the master key, and the atrest token. The caller opened dev
// with Exclusive, checked that the drive holds nothing worth keeping, and holds the
// custody lock (a rotation must not run meanwhile: its drive list is fixed).
func Format(dev blockdev.Device, path string, o FormatOptions) (*Info, error) {
	if o.SectorSize == 0 {
		o.SectorSize = 4096
	}
	vk := make([]byte, luks2.KeySize)
	defer clear(vk)
	for {
		rand.Read(vk)
		if !bytes.Equal(vk[:luks2.KeySize/2], vk[luks2.KeySize/2:]) {
			break
		}
	}
	t := o.Token
	t.Keyslots, t.MasterKeyID = nil, o.Key.ID
	h, err := luks2.Format(dev, luks2.FormatOptions{
		VolumeKey: vk, Passphrase: o.Key.Key, SectorSize: o.SectorSize, UUID: o.UUID,
		AllowDiscards: o.AllowDiscards, Token: &t,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if o.Wipe != nil {
		if err := wipeData(dev, h, vk, o.Wipe); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	in, err := info(h)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return in, nil
}

// wipeData opens the data segment and hands it to the caller's wipe function.
func wipeData(lower blockdev.Device, h *luks2.Header, vk []byte, wipe func(*blockcrypt.Device) error) error {
	dev, err := blockcrypt.New(nopClose{lower}, cryptConfig(h, vk, false))
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := wipe(dev); err != nil {
		return err
	}
	return dev.Flush()
}

// nopClose keeps a lower device open when the blockcrypt Device over it closes.
type nopClose struct{ blockdev.Device }

func (nopClose) Close() error { return nil }

// AdoptOptions configure Adopt.
type AdoptOptions struct {
	// OldKey is the passphrase (key file content) that opens the drive now.
	OldKey []byte
	// Key is the master key to add a keyslot for.
	Key Key
	// Token is the drive's place in the cluster; Adopt sets its keyslots and master key
	// id.
	Token luks2.AtrestToken
	// KeepOldKeyslot keeps the keyslot OldKey opens. By default it is wiped once the
	// master key's keyslot is verified, so that only the master key (and its rotations)
	// open the drive.
	KeepOldKeyslot bool
}

// Adopted says what Adopt did.
type Adopted struct {
	Info
	// OldSlot is the keyslot OldKey opened; wiped unless KeepOldKeyslot.
	OldSlot int
	// OtherSlots are keyslots atrest does not manage that still open the drive with
	// other passphrases (cryptsetup luksKillSlot removes them).
	OtherSlots []int
}

// Adopt brings an existing LUKS2 drive (aes-xts-plain64 with a 512-bit key, formatted by
// cryptsetup) into the cluster without touching its data: it opens a keyslot with
// OldKey, adds one wrapped by the master key, verifies it, writes the atrest token and
// wipes the old keyslot (unless kept). A wrong OldKey changes nothing (the error wraps
// luks2.ErrWrongKey). The caller opened dev with Exclusive, checked with Inspect that
// the drive is not a member already, and holds the custody lock.
func Adopt(dev blockdev.Device, path string, o AdoptOptions) (*Adopted, error) {
	h, err := loadHeader(dev, path, true)
	if err != nil {
		return nil, err
	}
	if id, err := uuid.Parse(h.UUID()); err != nil || id.String() != h.UUID() {
		return nil, fmt.Errorf("%s: LUKS UUID %q is not a UUID in canonical form", path, h.UUID())
	}
	vk, oldSlot, err := h.Unlock(dev, o.OldKey)
	if err != nil {
		return nil, fmt.Errorf("%s: the key file: %w", path, err)
	}
	defer clear(vk)
	slot, err := h.AddKeyslot(dev, vk, o.Key.Key)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := verifySlot(dev, path, slot, o.Key.Key, vk); err != nil {
		return nil, err
	}
	t := o.Token
	t.Keyslots, t.MasterKeyID = []int{slot}, o.Key.ID
	if err := h.SetAtrestToken(dev, &t); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if !o.KeepOldKeyslot {
		if err := h.WipeKeyslot(dev, oldSlot); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	in, err := info(h)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	r := &Adopted{Info: *in, OldSlot: oldSlot}
	for _, ks := range h.Keyslots() {
		if ks.ID != slot && (o.KeepOldKeyslot || ks.ID != oldSlot) {
			r.OtherSlots = append(r.OtherSlots, ks.ID)
		}
	}
	return r, nil
}

// verifySlot reads the header again from the drive and checks that key opens slot and
// yields the data key vk.
func verifySlot(dev luks2.Device, path string, slot int, key, vk []byte) error {
	h, err := luks2.Load(dev)
	if err != nil {
		return fmt.Errorf("%s: reread the header: %w", path, err)
	}
	got, err := h.UnlockSlot(dev, slot, key)
	if err != nil {
		return fmt.Errorf("%s: verify keyslot %d: %w", path, slot, err)
	}
	defer clear(got)
	if !bytes.Equal(got, vk) {
		panic("BUG: drive: a keyslot that passed the digest yields another data key")
	}
	return nil
}
