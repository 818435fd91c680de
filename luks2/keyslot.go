package luks2

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/atrest/atrest/blockcrypt"
)

// Keyslot areas are encrypted in 512-byte sectors with IVs counted from 0 at the
// start of the area (cryptsetup's LUKS2 keyslot convention).
const areaSectorSize = 512

// verifyKey checks a candidate volume key against the data segment's digest.
func (h *Header) verifyKey(key []byte) (bool, error) {
	d := h.m.segmentDigest()
	got, err := pbkdf2SHA256(key, d.Salt, d.Iterations, len(d.Value))
	if err != nil {
		return false, err
	}
	ok := subtle.ConstantTimeCompare(got, d.Value) == 1
	clear(got)
	return ok, nil
}

// UnlockSlot recovers the volume key from one keyslot with the passphrase, checking
// the slot against the allow-list before deriving anything. It returns an error
// wrapping ErrWrongKey if the passphrase does not open the slot, and one wrapping
// ErrUnsupported if the slot is outside the allow-list. The caller zeroes the key.
func (h *Header) UnlockSlot(dev io.ReaderAt, slot int, passphrase []byte) ([]byte, error) {
	ks, ok := h.m.keyslots[slot]
	if !ok {
		return nil, fmt.Errorf("keyslot %d does not exist", slot)
	}
	if d := h.m.segmentDigest(); ks.Digest != d.ID {
		return nil, fmt.Errorf("keyslot %d does not hold the data segment's key: %w", slot, ErrUnsupported)
	}
	if err := checkKeyslot(ks); err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", slot, err)
	}
	n := afAreaSize(ks.KeySize)
	if s, ok := dev.(interface{ Size() int64 }); ok && ks.Area.Offset > s.Size()-n {
		return nil, fmt.Errorf("keyslot %d: its key material [%d, %d) lies beyond the end of the %d-byte drive: %w",
			slot, ks.Area.Offset, ks.Area.Offset+n, s.Size(), ErrTruncated)
	}
	areaKey, err := derive(&ks.KDF, passphrase, ks.Area.KeySize)
	if err != nil {
		return nil, fmt.Errorf("keyslot %d: %w", slot, err)
	}
	defer clear(areaKey)
	c, err := blockcrypt.NewCipher(areaKey)
	if err != nil {
		// Equal halves of a derived key: only a wrong passphrase can make them, with
		// a probability of 2^-256.
		return nil, fmt.Errorf("keyslot %d: derived area key: %v: %w", slot, err, ErrWrongKey)
	}
	defer c.Close()
	material := make([]byte, n)
	defer clear(material)
	if _, err := dev.ReadAt(material, ks.Area.Offset); err != nil {
		if isEOF(err) {
			return nil, fmt.Errorf("keyslot %d: read area at %d: %w: %w", slot, ks.Area.Offset, ErrTruncated, err)
		}
		return nil, fmt.Errorf("keyslot %d: read area at %d: %w", slot, ks.Area.Offset, err)
	}
	c.DecryptSectors(material, material, areaSectorSize, 0)
	key := afMerge(material, ks.KeySize, ks.AF.Stripes)
	ok, err = h.verifyKey(key)
	if err != nil {
		clear(key)
		return nil, err
	}
	if !ok {
		clear(key)
		return nil, fmt.Errorf("keyslot %d: %w", slot, ErrWrongKey)
	}
	return key, nil
}

// Unlock tries the keyslots (high priority first, then normal, each by id; slots of
// priority 0 only when named with UnlockSlot) and returns the volume key and the
// slot that opened. Slots outside the allow-list are skipped. If nothing opens:
//   - a slot whose area could not be read (an I/O error, or ErrTruncated) may hold the
//     key, so nothing is said about the key: the error wraps those slots' errors;
//   - otherwise, if a slot was tried and refused the passphrase, the error wraps
//     ErrWrongKey and names the skipped slots;
//   - otherwise every slot was skipped, and the error wraps ErrUnsupported.
func (h *Header) Unlock(dev io.ReaderAt, passphrase []byte) ([]byte, int, error) {
	ids := slices.Sorted(maps.Keys(h.m.keyslots))
	slices.SortStableFunc(ids, func(a, b int) int { return h.m.keyslots[b].Priority - h.m.keyslots[a].Priority })
	return h.UnlockAny(dev, ids, passphrase)
}

// UnlockAny is Unlock over the given slots, in that order.
func (h *Header) UnlockAny(dev io.ReaderAt, slots []int, passphrase []byte) ([]byte, int, error) {
	var skipped, failed []error
	tried := false
	for _, id := range slots {
		ks, ok := h.m.keyslots[id]
		if !ok || ks.Priority == 0 {
			continue
		}
		key, err := h.UnlockSlot(dev, id, passphrase)
		switch {
		case err == nil:
			return key, id, nil
		case errors.Is(err, ErrWrongKey):
			tried = true
		case errors.Is(err, ErrUnsupported):
			skipped = append(skipped, err)
		default:
			failed = append(failed, err)
		}
	}
	switch {
	case len(failed) > 0:
		return nil, -1, joinErrors(failed)
	case !tried && len(skipped) > 0:
		return nil, -1, fmt.Errorf("no keyslot atrest can open: %w", joinErrors(skipped))
	case len(skipped) > 0:
		var s []string
		for _, err := range skipped {
			s = append(s, err.Error())
		}
		return nil, -1, fmt.Errorf("%w (skipped: %s)", ErrWrongKey, strings.Join(s, "; "))
	}
	return nil, -1, ErrWrongKey
}

// joinErrors wraps every error of errs on one line, separated by "; ".
func joinErrors(errs []error) error {
	if len(errs) == 1 {
		return errs[0]
	}
	format := strings.TrimSuffix(strings.Repeat("%w; ", len(errs)), "; ")
	args := make([]any, len(errs))
	for i, err := range errs {
		args[i] = err
	}
	return fmt.Errorf(format, args...)
}

// VerifyVolumeKey reports whether key is the volume key of the data segment.
func (h *Header) VerifyVolumeKey(key []byte) (bool, error) {
	if len(key) != KeySize {
		return false, nil
	}
	return h.verifyKey(key)
}

// AddKeyslot wraps the volume key with the passphrase in a new keyslot of atrest's
// profile (PBKDF2-SHA256 at 1000 iterations, AF 4000 stripes, aes-xts-plain64): it
// writes and flushes the keyslot area first, then the header (see commit). The
// volume key must match the header's digest. It returns the new slot's id.
func (h *Header) AddKeyslot(dev Device, volumeKey, passphrase []byte) (int, error) {
	ok, err := h.VerifyVolumeKey(volumeKey)
	if err != nil {
		return -1, err
	}
	if !ok {
		return -1, errors.New("the volume key does not match the header's digest")
	}
	root := h.edit()
	slot, err := h.writeKeyslot(dev, root, volumeKey, passphrase)
	if err != nil {
		return -1, err
	}
	if err := h.commit(dev, root); err != nil {
		return -1, err
	}
	return slot, nil
}

// writeKeyslot allocates the lowest free keyslot id and the first free area, writes
// the wrapped key there, flushes, and adds the slot to root (not yet committed).
func (h *Header) writeKeyslot(dev Device, root object, volumeKey, passphrase []byte) (int, error) {
	slot := -1
	for id := range maxKeyslots {
		if _, used := h.m.keyslots[id]; !used {
			slot = id
			break
		}
	}
	if slot < 0 {
		return -1, fmt.Errorf("all %d keyslots are in use: %w", maxKeyslots, ErrNoSpace)
	}
	off, err := h.freeArea(KeyslotAreaSize)
	if err != nil {
		return -1, err
	}
	kdf := KDF{Type: "pbkdf2", Hash: "sha256", Iterations: Iterations, Salt: randomBytes(saltSize)}
	areaKey, err := derive(&kdf, passphrase, KeySize)
	if err != nil {
		return -1, err
	}
	defer clear(areaKey)
	c, err := blockcrypt.NewCipher(areaKey)
	if err != nil {
		return -1, fmt.Errorf("derived area key: %w", err)
	}
	defer c.Close()
	split := afSplit(volumeKey, Stripes)
	defer clear(split)
	area := make([]byte, KeyslotAreaSize)
	copy(area, split)
	c.EncryptSectors(area[:afAreaSize(KeySize)], area[:afAreaSize(KeySize)], areaSectorSize, 0)
	// The tail of the area past the key material is random, as cryptsetup's wipe
	// leaves it.
	rand.Read(area[afAreaSize(KeySize):])
	if _, err := dev.WriteAt(area, off); err != nil {
		return -1, fmt.Errorf("write keyslot %d area at %d: %w", slot, off, err)
	}
	if err := dev.Flush(); err != nil {
		return -1, fmt.Errorf("flush keyslot %d area: %w", slot, err)
	}
	root["keyslots"].(object)[idString(slot)] = object{
		"type":     "luks2",
		"key_size": jsonInt(KeySize),
		"af":       object{"type": "luks1", "stripes": jsonInt(Stripes), "hash": "sha256"},
		"area": object{
			"type":       "raw",
			"offset":     fmt.Sprint(off),
			"size":       fmt.Sprint(KeyslotAreaSize),
			"encryption": DataCipher,
			"key_size":   jsonInt(KeySize),
		},
		"kdf": object{
			"type":       "pbkdf2",
			"hash":       "sha256",
			"iterations": jsonInt(Iterations),
			"salt":       base64.StdEncoding.EncodeToString(kdf.Salt),
		},
	}
	d := root["digests"].(object)[idString(h.m.segmentDigest().ID)].(object)
	d["keyslots"] = append(d["keyslots"].([]any), idString(slot))
	return slot, nil
}

// freeArea returns the lowest 4 KiB-aligned offset in the keyslots area where size
// bytes overlap no keyslot's area.
func (h *Header) freeArea(size int64) (int64, error) {
	start, end := 2*h.hdrSize, 2*h.hdrSize+h.m.keyslotsSize
	areas := make([]Area, 0, len(h.m.keyslots))
	for _, ks := range h.m.keyslots {
		areas = append(areas, ks.Area)
	}
	slices.SortFunc(areas, func(a, b Area) int { return int(a.Offset - b.Offset) })
	off := start
	for _, a := range areas {
		if a.Offset >= off+size {
			break
		}
		off = max(off, (a.Offset+a.Size+4095)&^4095)
	}
	if off+size > end {
		return -1, fmt.Errorf("no free %d-byte area in the keyslots area [%d, %d): %w", size, start, end, ErrNoSpace)
	}
	return off, nil
}

// WipeKeyslot destroys a keyslot: random bytes over its whole area, flushed, then a
// header without the slot (removed from its digest and from every token). A crash
// in between leaves a slot whose area no key opens.
func (h *Header) WipeKeyslot(dev Device, slot int) error {
	ks, ok := h.m.keyslots[slot]
	if !ok {
		return fmt.Errorf("keyslot %d does not exist", slot)
	}
	if _, err := dev.WriteAt(randomBytes(int(ks.Area.Size)), ks.Area.Offset); err != nil {
		return fmt.Errorf("wipe keyslot %d area at %d: %w", slot, ks.Area.Offset, err)
	}
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("flush keyslot %d wipe: %w", slot, err)
	}
	root := h.edit()
	delete(root["keyslots"].(object), idString(slot))
	for _, sec := range []string{"digests", "tokens"} {
		for _, v := range root[sec].(object) {
			o := v.(object)
			o["keyslots"] = slices.DeleteFunc(o["keyslots"].([]any), func(e any) bool { return e == idString(slot) })
		}
	}
	return h.commit(dev, root)
}
