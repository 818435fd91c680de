package luks2

import (
	"fmt"
	"slices"
)

// The allow-list: what atrest derives keys from, checked before any derivation so
// that a crafted header cannot make a KDF run for hours or take all memory. The
// defaults of cryptsetup 2.6 (argon2id, 4 passes, 1 GiB, up to 4 threads; PBKDF2 at
// a 2-second benchmark) fit inside; see docs/luks2-profile.md for the reasoning.
const (
	// KeySize is the size of every key atrest handles in a header: the volume key
	// (AES-256-XTS) and the keyslot area key.
	KeySize = 64
	// Stripes is the only AF stripe count LUKS2 uses.
	Stripes = 4000

	// MinPBKDF2Iterations is cryptsetup's own lower bound.
	MinPBKDF2Iterations = 1000
	// MaxPBKDF2Iterations bounds PBKDF2-SHA256 to a few seconds.
	MaxPBKDF2Iterations = 1 << 24

	// MaxArgon2Time bounds the passes of Argon2.
	MaxArgon2Time = 32
	// MaxArgon2MemoryKiB is cryptsetup's maximum, 4 GiB.
	MaxArgon2MemoryKiB = 4 << 20
	// MaxArgon2CPUs bounds the lanes of Argon2.
	MaxArgon2CPUs = 64
	// MaxArgon2Work bounds passes × memory (in KiB): 16 GiB touched in all, a few
	// seconds; cryptsetup's default of 4 passes over 1 GiB is a quarter of it.
	MaxArgon2Work = 16 << 20

	// maxSaltSize bounds KDF and digest salts (cryptsetup uses 32 bytes).
	maxSaltSize = 256
)

// DataCipher is the only data and keyslot area cipher atrest accepts.
const DataCipher = "aes-xts-plain64"

// checkKDF applies the allow-list to a keyslot's key derivation.
func checkKDF(k *KDF) error {
	if len(k.Salt) == 0 || len(k.Salt) > maxSaltSize {
		return fmt.Errorf("kdf salt of %d bytes (want 1 to %d): %w", len(k.Salt), maxSaltSize, ErrUnsupported)
	}
	switch k.Type {
	case "pbkdf2":
		if k.Hash != "sha256" {
			return fmt.Errorf("pbkdf2 hash %q (atrest supports sha256): %w", k.Hash, ErrUnsupported)
		}
		return checkIterations("kdf", k.Iterations)
	case "argon2i", "argon2id":
		switch {
		case k.Time < 1 || k.Time > MaxArgon2Time:
			return fmt.Errorf("%s time cost %d is outside [1, %d]: %w", k.Type, k.Time, MaxArgon2Time, ErrUnsupported)
		case k.CPUs < 1 || k.CPUs > MaxArgon2CPUs:
			return fmt.Errorf("%s parallel cost %d is outside [1, %d]: %w", k.Type, k.CPUs, MaxArgon2CPUs, ErrUnsupported)
		case k.Memory < 8*k.CPUs || k.Memory > MaxArgon2MemoryKiB:
			return fmt.Errorf("%s memory cost %d KiB is outside [%d, %d]: %w", k.Type, k.Memory, 8*k.CPUs, MaxArgon2MemoryKiB, ErrUnsupported)
		case int64(k.Time)*int64(k.Memory) > MaxArgon2Work:
			return fmt.Errorf("%s cost of %d passes over %d KiB exceeds the limit of %d KiB in all: %w", k.Type, k.Time, k.Memory, MaxArgon2Work, ErrUnsupported)
		}
		return nil
	default:
		return fmt.Errorf("kdf type %q (atrest supports pbkdf2, argon2i, argon2id): %w", k.Type, ErrUnsupported)
	}
}

func checkIterations(what string, n int) error {
	if n < MinPBKDF2Iterations || n > MaxPBKDF2Iterations {
		return fmt.Errorf("%s iterations %d are outside [%d, %d]: %w", what, n, MinPBKDF2Iterations, MaxPBKDF2Iterations, ErrUnsupported)
	}
	return nil
}

// checkKeyslot applies the allow-list to a keyslot before its key is derived.
func checkKeyslot(ks *Keyslot) error {
	if ks.Type != "luks2" {
		return fmt.Errorf("keyslot type %q (atrest opens luks2 keyslots): %w", ks.Type, ErrUnsupported)
	}
	if ks.KeySize != KeySize {
		return fmt.Errorf("key size %d bytes (atrest needs %d, AES-256-XTS): %w", ks.KeySize, KeySize, ErrUnsupported)
	}
	if ks.Area.Encryption != DataCipher || ks.Area.KeySize != KeySize {
		return fmt.Errorf("area cipher %s with a %d-byte key (atrest supports %s with %d): %w",
			ks.Area.Encryption, ks.Area.KeySize, DataCipher, KeySize, ErrUnsupported)
	}
	if ks.AF.Type != "luks1" || ks.AF.Stripes != Stripes || ks.AF.Hash != "sha256" {
		return fmt.Errorf("af %s with %d stripes and hash %q (atrest supports luks1, %d, sha256): %w",
			ks.AF.Type, ks.AF.Stripes, ks.AF.Hash, Stripes, ErrUnsupported)
	}
	if need := afAreaSize(ks.KeySize); ks.Area.Size < need {
		return fmt.Errorf("area of %d bytes is smaller than the %d bytes the key material needs: %w", ks.Area.Size, need, ErrUnsupported)
	}
	return checkKDF(&ks.KDF)
}

// checkProfile applies the allow-list to the parts of a header every unlock needs:
// no requirements (reencryption, OPAL, ...), one crypt data segment in
// aes-xts-plain64 without integrity, and its pbkdf2-SHA256 digest.
func checkProfile(m *meta) error {
	if len(m.requirements) > 0 {
		return fmt.Errorf("header requires %v (a reencryption or an extension atrest does not support): %w", m.requirements, ErrUnsupported)
	}
	for _, ks := range m.keyslots {
		if ks.Type == "reencrypt" {
			return fmt.Errorf("keyslot %d is a reencryption keyslot: %w", ks.ID, ErrUnsupported)
		}
	}
	if len(m.segments) != 1 {
		return fmt.Errorf("header has %d segments (atrest supports exactly one data segment): %w", len(m.segments), ErrUnsupported)
	}
	s := m.segments[m.segmentID()]
	switch {
	case s.Type != "crypt":
		return fmt.Errorf("segment type %q (atrest supports crypt): %w", s.Type, ErrUnsupported)
	case s.Encryption != DataCipher:
		return fmt.Errorf("data cipher %q (atrest supports %s): %w", s.Encryption, DataCipher, ErrUnsupported)
	case s.Integrity:
		return fmt.Errorf("data segment with integrity protection: %w", ErrUnsupported)
	case s.SectorSize != 512 && s.SectorSize != 4096:
		return fmt.Errorf("data sector size %d (atrest supports 512 and 4096): %w", s.SectorSize, ErrUnsupported)
	case len(s.Flags) > 0:
		return fmt.Errorf("data segment flags %v: %w", s.Flags, ErrUnsupported)
	}
	d := m.segmentDigest()
	if d == nil {
		return fmt.Errorf("no digest covers the data segment: %w", ErrUnsupported)
	}
	if d.Type != "pbkdf2" || d.Hash != "sha256" {
		return fmt.Errorf("digest %s with hash %q (atrest supports pbkdf2 with sha256): %w", d.Type, d.Hash, ErrUnsupported)
	}
	if len(d.Salt) == 0 || len(d.Salt) > maxSaltSize || len(d.Value) != 32 {
		return fmt.Errorf("digest with a %d-byte salt and a %d-byte value (want 1 to %d and 32): %w", len(d.Salt), len(d.Value), maxSaltSize, ErrUnsupported)
	}
	if err := checkIterations("digest", d.Iterations); err != nil {
		return err
	}
	for _, k := range d.Keyslots {
		if ks := m.keyslots[k]; ks.KeySize != KeySize {
			return fmt.Errorf("keyslot %d holds a %d-byte volume key (atrest needs %d, AES-256-XTS): %w", k, ks.KeySize, KeySize, ErrUnsupported)
		}
	}
	return nil
}

// segmentID is the id of the only segment (checkProfile has run).
func (m *meta) segmentID() int {
	for id := range m.segments {
		return id
	}
	return -1
}

// segmentDigest is the digest that covers the data segment, or nil; more than one is
// refused.
func (m *meta) segmentDigest() *Digest {
	var r *Digest
	sid := m.segmentID()
	for _, d := range m.digests {
		if slices.Contains(d.Segments, sid) {
			if r != nil {
				return nil
			}
			r = d
		}
	}
	return r
}
