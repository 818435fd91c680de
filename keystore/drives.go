package keystore

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"

	"github.com/google/uuid"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

var (
	// ErrDriveMissing: a registered drive is not at its last known path (or another
	// drive is there).
	ErrDriveMissing = errors.New("drive is absent")
	// ErrRegistered: the drive is already a member of this cluster.
	ErrRegistered = errors.New("drive is already registered")
	// ErrVolumeExists: the volume name is taken.
	ErrVolumeExists = errors.New("volume already exists")
	// ErrForeign is returned when a drive carries no atrest token of this cluster.
	ErrForeign = errors.New("drive is not a member of this cluster")
	// ErrRotationUnderWay: a key rotation was interrupted; it must finish before a drive
	// joins or leaves.
	ErrRotationUnderWay = errors.New("a key rotation is under way")
)

// Opening drives. A command that replaces a header or a data key (format, adopt) opens
// the drive exclusively, and so does the daemon for the drives it serves (Unlock with
// Exclusive): neither can then pull a drive from under the other, whichever keystore
// each uses (blockdev.ErrInUse). Rotation only rewraps keyslots, crash-safely beside
// a daemon, and status only reads: they open without the exclusive hold.

// openDrive opens the drive at path read-write for a rotation step.
func openDrive(path string) (*blockdev.File, error) {
	return blockdev.OpenFile(path, blockdev.FileOptions{})
}

// openDriveReadOnly opens the drive at path to read it beside whoever uses it.
func openDriveReadOnly(path string) (*blockdev.File, error) {
	return blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: true})
}

// openDriveExclusive opens the drive at path read-write and holds it (format, adopt).
func openDriveExclusive(path string) (*blockdev.File, error) {
	return blockdev.OpenFile(path, blockdev.FileOptions{Exclusive: true})
}

// dataConfig is the blockcrypt configuration of a header's data segment, without the
// key: Unlock opens it, FormatDrive wipes it and Status checks it against the drive
// (blockcrypt.Config.RegionSize), so that all three apply the same rules.
func dataConfig(h *luks2.Header) blockcrypt.Config {
	s := h.Segment()
	size := int64(0) // dynamic: to the end of the drive
	if s.Size >= 0 {
		size = s.Size
	}
	return blockcrypt.Config{
		Offset: s.Offset, Size: size, SectorSize: s.SectorSize, IVTweak: s.IVTweak,
		AllowDiscards: h.AllowDiscards(),
	}
}

// loadHeader loads a drive's header; when repair is set (the lock is held), a
// damaged or stale copy is rewritten from the good one.
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

// atrestSlots orders the slots to try with a master key: those the atrest token
// names, then the other PBKDF2 slots (atrest writes only those; Argon2 slots of an
// adopted drive's old passphrase would cost seconds each for nothing).
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

// FormatOptions configure FormatDrive.
type FormatOptions struct {
	Volume        string // volume name; "" picks vol0, vol1, ...
	SectorSize    int    // 4096 (default) or 512
	AllowDiscards bool
	// Wipe, if set, is called after the header is written with the data segment
	// opened for writing, to fill it (the caller shows progress).
	Wipe func(dev *blockcrypt.Device) error
}

// FormatDrive writes a LUKS2 header to the drive at path with a new random data key
// wrapped by the master key, and registers the drive. The caller checked that the
// path holds nothing worth keeping.
func (k *Keystore) FormatDrive(path string, o FormatOptions) (*Drive, error) {
	if !k.lockHeld() {
		panic("BUG: keystore: FormatDrive without the lock")
	}
	if k.state.Rotation != nil {
		return nil, ErrRotationUnderWay
	}
	if o.SectorSize == 0 {
		o.SectorSize = 4096
	}
	dev, err := openDriveExclusive(path)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	master, err := readKey(k.path(MasterKeyFile))
	if err != nil {
		return nil, err
	}
	defer clear(master)
	vk := make([]byte, luks2.KeySize)
	defer clear(vk)
	for {
		rand.Read(vk)
		if !bytes.Equal(vk[:32], vk[32:]) {
			break
		}
	}
	// Reformatting a registered drive (the caller forced it) replaces its entry.
	replaced := -1
	if h, err := luks2.Load(dev); err == nil {
		replaced = slices.IndexFunc(k.state.Drives, func(d Drive) bool { return d.UUID == h.UUID() })
	}
	except := ""
	if replaced >= 0 {
		except = k.state.Drives[replaced].UUID
	}
	vol := o.Volume
	if replaced >= 0 && vol == "" {
		vol = k.state.Drives[replaced].Volume
	} else if vol, err = k.newVolumeName(vol, except); err != nil {
		return nil, err
	}
	d := Drive{
		UUID: uuid.NewString(), Volume: vol, VolumeUUID: uuid.NewString(),
		MemberIndex: 0, MemberCount: 1, KeyID: k.state.MasterKey.ID,
		Path: path, SectorSize: o.SectorSize, State: DriveActive, Added: k.now(),
	}
	h, err := luks2.Format(dev, luks2.FormatOptions{
		VolumeKey: vk, Passphrase: master, SectorSize: o.SectorSize, UUID: d.UUID,
		AllowDiscards: o.AllowDiscards, Token: d.token(k.state.ClusterUUID),
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if o.Wipe != nil {
		if err := wipeData(dev, h, vk, o.Wipe); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	if replaced >= 0 {
		k.state.Drives = slices.Delete(k.state.Drives, replaced, replaced+1)
	}
	k.state.Drives = append(k.state.Drives, d)
	if err := k.save(); err != nil {
		return nil, err
	}
	return &d, nil
}

// wipeData opens the data segment and hands it to the caller's wipe function.
func wipeData(lower blockdev.Device, h *luks2.Header, vk []byte, wipe func(*blockcrypt.Device) error) error {
	cfg := dataConfig(h)
	cfg.Key = vk
	dev, err := blockcrypt.New(nopClose{lower}, cfg)
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

func (d *Drive) token(cluster string) *luks2.AtrestToken {
	return &luks2.AtrestToken{
		ClusterUUID: cluster, Volume: d.Volume, VolumeUUID: d.VolumeUUID,
		MemberIndex: d.MemberIndex, MemberCount: d.MemberCount, MasterKeyID: d.KeyID,
	}
}

func (k *Keystore) path(name string) string { return k.dir + "/" + name }

// newVolumeName checks a requested volume name, or picks the first free volN.
// The drive named by except (being replaced) does not count.
func (k *Keystore) newVolumeName(name, except string) (string, error) {
	taken := func(n string) bool {
		return slices.ContainsFunc(k.state.Drives, func(d Drive) bool { return d.Volume == n && d.UUID != except })
	}
	if name == "" {
		for i := 0; ; i++ {
			if n := fmt.Sprintf("vol%d", i); !taken(n) {
				return n, nil
			}
		}
	}
	if !ValidVolumeName(name) {
		return "", fmt.Errorf("volume name %q: use 1 to 64 letters, digits, '.', '_' or '-'", name)
	}
	if taken(name) {
		return "", fmt.Errorf("volume %q: %w (one drive per volume until mirrors arrive)", name, ErrVolumeExists)
	}
	return name, nil
}

// AdoptOptions configure AdoptDrive.
type AdoptOptions struct {
	Volume string // "" picks vol0, vol1, ...
	// KeepOldKeyslot keeps the keyslot the old key opens. By default it is wiped
	// once the master key's keyslot is verified, so that only the master key (and
	// its rotations) open the drive.
	KeepOldKeyslot bool
}

// AdoptResult says what AdoptDrive did.
type AdoptResult struct {
	Drive Drive
	// OldSlot is the keyslot the old key opened; wiped unless KeepOldKeyslot.
	OldSlot int
	// OtherSlots are keyslots atrest does not manage that still open the drive
	// with other passphrases (cryptsetup luksKillSlot removes them).
	OtherSlots []int
}

// AdoptDrive brings an existing LUKS2 drive (aes-xts-plain64 with a 512-bit key,
// formatted by cryptsetup) into the cluster without touching its data: it opens a
// keyslot with oldKey, adds one wrapped by the master key, verifies it, writes the
// atrest token, wipes the old keyslot (unless asked not to) and registers the drive.
func (k *Keystore) AdoptDrive(path string, oldKey []byte, o AdoptOptions) (*AdoptResult, error) {
	if !k.lockHeld() {
		panic("BUG: keystore: AdoptDrive without the lock")
	}
	if k.state.Rotation != nil {
		return nil, ErrRotationUnderWay
	}
	dev, err := openDriveExclusive(path)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	h, err := loadHeader(dev, path, true)
	if err != nil {
		return nil, err
	}
	if d := k.state.drive(h.UUID()); d != nil {
		return nil, fmt.Errorf("%s (drive %s, volume %s): %w", path, d.UUID, d.Volume, ErrRegistered)
	}
	if !validUUID(h.UUID()) {
		return nil, fmt.Errorf("%s: LUKS UUID %q is not a UUID", path, h.UUID())
	}
	vol, err := k.newVolumeName(o.Volume, "")
	if err != nil {
		return nil, err
	}
	vk, oldSlot, err := h.Unlock(dev, oldKey)
	if err != nil {
		return nil, fmt.Errorf("%s: the key file: %w", path, err)
	}
	defer clear(vk)
	master, err := readKey(k.path(MasterKeyFile))
	if err != nil {
		return nil, err
	}
	defer clear(master)
	slot, err := h.AddKeyslot(dev, vk, master)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := verifySlot(dev, path, slot, master, vk); err != nil {
		return nil, err
	}
	d := Drive{
		UUID: h.UUID(), Volume: vol, VolumeUUID: uuid.NewString(), MemberCount: 1,
		KeyID: k.state.MasterKey.ID, Path: path, SectorSize: h.Segment().SectorSize,
		State: DriveActive, Added: k.now(),
	}
	t := d.token(k.state.ClusterUUID)
	t.Keyslots = []int{slot}
	if err := h.SetAtrestToken(dev, t); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if !o.KeepOldKeyslot {
		if err := h.WipeKeyslot(dev, oldSlot); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	r := &AdoptResult{Drive: d, OldSlot: oldSlot}
	for _, ks := range h.Keyslots() {
		if ks.ID != slot && (o.KeepOldKeyslot || ks.ID != oldSlot) {
			r.OtherSlots = append(r.OtherSlots, ks.ID)
		}
	}
	k.state.Drives = append(k.state.Drives, d)
	if err := k.save(); err != nil {
		return nil, err
	}
	return r, nil
}

// verifySlot re-reads the header from the drive and checks that key opens slot and
// yields vk.
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
		panic("BUG: keystore: a keyslot that passed the digest yields another volume key")
	}
	return nil
}
