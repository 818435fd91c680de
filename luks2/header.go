package luks2

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"

	"github.com/google/uuid"

	"github.com/atrest/atrest/blockdev"
)

// Sentinel errors; every error the package returns that matches one wraps it.
var (
	// ErrNotLUKS: neither header copy carries a LUKS2 magic.
	ErrNotLUKS = errors.New("no LUKS2 header")
	// ErrDamaged: no header copy is valid; nothing was written.
	ErrDamaged = errors.New("both LUKS2 header copies are damaged")
	// ErrUnsupported: a valid LUKS2 header (or one keyslot) outside atrest's allow-list.
	ErrUnsupported = errors.New("not supported by atrest")
	// ErrWrongKey: no keyslot opens with the given passphrase (key file).
	ErrWrongKey = errors.New("no keyslot opens with this key")
	// ErrNoSpace: no free keyslot number or keyslot area is left.
	ErrNoSpace = errors.New("no room for another keyslot")
	// ErrTruncated: the header is valid but describes areas past the end of the drive
	// (an image truncated, or the header copied onto a smaller drive).
	ErrTruncated = errors.New("drive is smaller than its LUKS2 header says")
)

// Errors of the drive itself (a read that fails with EIO, a drive that is gone) are
// none of these: they are returned wrapped as they are, so that a drive that cannot be
// read is never taken for a damaged header.

// Device is what the header code needs of a drive; every blockdev.Device has it.
type Device interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
	Flush() error
}

// The fixed profile atrest formats.
const (
	// HeaderSize is the size of one header copy (binary header + 12 KiB JSON area).
	HeaderSize = 16384
	// DataOffset is where the data segment starts: 16 MiB, as cryptsetup's default.
	DataOffset = 16 << 20
	// KeyslotsSize is the keyslot area: everything between the two header copies and
	// the data, room for 64 keyslots of KeyslotAreaSize.
	KeyslotsSize = DataOffset - 2*HeaderSize
	// KeyslotAreaSize is the area of one keyslot: 4000 stripes of a 64-byte key,
	// rounded up to 4 KiB (cryptsetup allocates the same).
	KeyslotAreaSize = (Stripes*KeySize + 4095) &^ 4095
	// Iterations is the PBKDF2-SHA256 cost of atrest's keyslots and digests: the
	// passphrase is a 256-bit random master key, so the KDF adds nothing but time.
	Iterations = 1000
	saltSize   = 32
)

// Header is a LUKS2 header read from a drive or about to be written to it.
type Header struct {
	hdrSize   int64
	seqid     uint64
	uuid      string
	label     string
	subsystem string
	salts     [2][saltLen]byte
	m         *meta
	// copyErr[i] says why copy i (0 primary, 1 secondary) is not current: damaged,
	// or stale (lower seqid or different content). nil when it is current.
	copyErr [2]error
}

// copyResult is what readCopy found at one place.
type copyResult struct {
	bin  *binHeader
	m    *meta
	text []byte
	err  error
	// ioErr is set when a read failed for another reason than the end of the drive:
	// the drive could not be read, so nothing is known about the copy.
	ioErr error
}

// readCopy reads and validates one header copy at off.
func readCopy(dev io.ReaderAt, off int64) copyResult {
	b := make([]byte, binHeaderSize)
	if _, err := dev.ReadAt(b, off); err != nil {
		return readFailed(nil, binHeaderSize, off, err)
	}
	bin, err := decodeBinary(b, off)
	if err != nil {
		return copyResult{err: err}
	}
	// The rest of the copy after the binary header, read above.
	area := make([]byte, bin.hdrSize)
	copy(area, b)
	if _, err := dev.ReadAt(area[binHeaderSize:], off+binHeaderSize); err != nil {
		return readFailed(bin, bin.hdrSize-binHeaderSize, off+binHeaderSize, err)
	}
	if err := verifyChecksum(area); err != nil {
		return copyResult{bin: bin, err: err}
	}
	text, err := jsonText(area)
	if err != nil {
		return copyResult{bin: bin, err: err}
	}
	root, err := decodeJSON(text)
	if err != nil {
		return copyResult{bin: bin, err: err}
	}
	m, err := parseMeta(root, bin.hdrSize)
	if err != nil {
		return copyResult{bin: bin, err: fmt.Errorf("metadata: %w", err)}
	}
	return copyResult{bin: bin, m: m, text: text}
}

// readFailed is the result of a read of n bytes at off that failed with err: a copy
// cut short by the end of the drive is damaged; any other failure is an I/O error.
func readFailed(bin *binHeader, n, off int64, err error) copyResult {
	c := copyResult{bin: bin, err: fmt.Errorf("read %d bytes at %d: %w", n, off, err)}
	if !isEOF(err) {
		c.ioErr = err
	}
	return c
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// Load reads both header copies, validates them like cryptsetup (magic and version
// per copy, header size and offset, checksum, JSON rules) and keeps the valid one
// with the higher seqid. It never writes: NeedsRepair tells whether a copy is damaged
// or stale, and Repair rewrites it. The allow-list for the data segment and digest is
// applied here; keyslots are checked when they are used.
//
// When no copy is valid and a read failed for another reason than the end of the
// drive, Load returns that read error (not ErrDamaged): a drive that cannot be read
// says nothing about its header.
func Load(dev io.ReaderAt) (*Header, error) {
	var ioErr error
	read := func(off int64) copyResult {
		c := readCopy(dev, off)
		if ioErr == nil {
			ioErr = c.ioErr
		}
		return c
	}
	c0 := read(0)
	var c1 copyResult
	if c0.bin != nil {
		c1 = read(c0.bin.hdrSize)
	}
	if c1.m == nil {
		// The primary is unreadable or its size field lies: look for the secondary
		// at every offset the specification allows, keeping the most telling failure
		// (a copy with a sound binary header) for the error.
		for _, off := range hdrSizes {
			if c0.bin != nil && off == c0.bin.hdrSize {
				continue
			}
			c := read(off)
			if c.m != nil || (c1.bin == nil && c.bin != nil) {
				c1 = c
			}
			if c.m != nil {
				break
			}
		}
		if c1.err == nil && c1.m == nil {
			c1.err = fmt.Errorf("no secondary header: %w", ErrNotLUKS)
		}
	}
	if c0.m == nil && c1.m == nil {
		if ioErr != nil {
			return nil, fmt.Errorf("LUKS2 header unreadable: %w", ioErr)
		}
		if errors.Is(c0.err, ErrNotLUKS) && errors.Is(c1.err, ErrNotLUKS) {
			return nil, ErrNotLUKS
		}
		if errors.Is(c0.err, ErrUnsupported) {
			return nil, fmt.Errorf("primary header: %w", c0.err)
		}
		return nil, fmt.Errorf("%w (primary: %v; secondary: %v)", ErrDamaged, c0.err, c1.err)
	}
	h := &Header{}
	use := c0
	switch {
	case c0.m == nil:
		use = c1
		h.copyErr[0] = fmt.Errorf("primary header damaged: %w", c0.err)
	case c1.m == nil:
		h.copyErr[1] = fmt.Errorf("secondary header damaged: %w", c1.err)
	case c0.bin.hdrSize != c1.bin.hdrSize:
		h.copyErr[1] = fmt.Errorf("secondary header size %d differs from the primary's %d", c1.bin.hdrSize, c0.bin.hdrSize)
	case c1.bin.seqid > c0.bin.seqid:
		use = c1
		h.copyErr[0] = fmt.Errorf("primary header is stale (seqid %d, secondary %d)", c0.bin.seqid, c1.bin.seqid)
	case c0.bin.seqid > c1.bin.seqid:
		h.copyErr[1] = fmt.Errorf("secondary header is stale (seqid %d, primary %d)", c1.bin.seqid, c0.bin.seqid)
	case !bytes.Equal(c0.text, c1.text) || c0.bin.uuid != c1.bin.uuid || c0.bin.label != c1.bin.label || c0.bin.subsystem != c1.bin.subsystem:
		h.copyErr[1] = errors.New("secondary header differs from the primary at the same seqid")
	}
	h.hdrSize, h.seqid = use.bin.hdrSize, use.bin.seqid
	h.uuid, h.label, h.subsystem = use.bin.uuid, use.bin.label, use.bin.subsystem
	h.m = use.m
	if c0.bin != nil {
		h.salts[0] = c0.bin.salt
	}
	if c1.bin != nil {
		h.salts[1] = c1.bin.salt
	}
	if err := checkProfile(h.m); err != nil {
		return nil, err
	}
	return h, nil
}

// ReadUUID returns the UUID that the binary header of dev names, without the
// checksum or the JSON area: the primary copy's first 4 KiB, or, where those carry no
// valid binary header, the secondary copy's binary header at each offset the
// specification allows. It is a quick look at which drive this is (a probe of a drive
// whose I/O failed), not a validation, which is Load's. It returns ErrNotLUKS when no
// copy carries a LUKS2 magic, and a read error of the primary copy as it is (a drive
// that cannot be read says nothing about its header).
func ReadUUID(dev io.ReaderAt) (string, error) {
	b := make([]byte, binHeaderSize)
	var primary error
	if _, err := dev.ReadAt(b, 0); err != nil && !isEOF(err) {
		return "", fmt.Errorf("read the primary binary header: %w", err)
	} else if err == nil {
		bin, err := decodeBinary(b, 0)
		if err == nil {
			return bin.uuid, nil
		}
		primary = fmt.Errorf("primary binary header: %w", err)
	}
	for _, off := range hdrSizes {
		if _, err := dev.ReadAt(b, off); err != nil {
			// Past the end of the drive (or unreadable there): the copies that
			// remain would be farther still.
			break
		}
		if bin, err := decodeBinary(b, off); err == nil {
			return bin.uuid, nil
		}
	}
	if primary != nil && !errors.Is(primary, ErrNotLUKS) {
		return "", primary
	}
	return "", ErrNotLUKS
}

// NeedsRepair reports whether a header copy is damaged or stale, with the reason.
func (h *Header) NeedsRepair() (bool, error) {
	err := errors.Join(h.copyErr[0], h.copyErr[1])
	return err != nil, err
}

// Repair rewrites every damaged or stale copy from the current one, with a fresh
// salt (as the specification asks), and flushes.
func (h *Header) Repair(dev Device) error {
	for i := range 2 {
		if h.copyErr[i] == nil {
			continue
		}
		rand.Read(h.salts[i][:])
		if err := h.writeCopy(dev, i, encodeJSON(h.m.root)); err != nil {
			return err
		}
		h.copyErr[i] = nil
	}
	return nil
}

// writeCopy writes copy i (0 primary, 1 secondary) with the header's seqid and
// flushes the device.
func (h *Header) writeCopy(dev Device, i int, text []byte) error {
	off := int64(0)
	if i == 1 {
		off = h.hdrSize
	}
	area, err := encodeCopy(&binHeader{
		secondary: i == 1, hdrSize: h.hdrSize, seqid: h.seqid,
		label: h.label, subsystem: h.subsystem, uuid: h.uuid,
		salt: h.salts[i], hdrOffset: off,
	}, text)
	if err != nil {
		return err
	}
	if _, err := dev.WriteAt(area, off); err != nil {
		return fmt.Errorf("write header copy at %d: %w", off, err)
	}
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("flush header copy at %d: %w", off, err)
	}
	return nil
}

// commit validates an edited tree and writes it as the next version of the header:
// the seqid goes up, then the primary copy is written and flushed, then the
// secondary. A crash at any moment leaves one valid copy (the old or the new
// version): the copy being written fails its checksum, the other one passes. Damaged
// or stale copies are overwritten by the same writes.
func (h *Header) commit(dev Device, root object) error {
	m, err := parseMeta(root, h.hdrSize)
	if err != nil {
		return fmt.Errorf("edited metadata is invalid: %w", err)
	}
	if err := checkProfile(m); err != nil {
		return err
	}
	text := encodeJSON(root)
	if int64(len(text))+1 > h.hdrSize-binHeaderSize {
		return fmt.Errorf("metadata of %d bytes does not fit the %d-byte JSON area", len(text), h.hdrSize-binHeaderSize)
	}
	h.seqid++
	for i := range 2 {
		if h.copyErr[i] != nil {
			rand.Read(h.salts[i][:])
		}
		if err := h.writeCopy(dev, i, text); err != nil {
			return err
		}
		h.copyErr[i] = nil
	}
	h.m = m
	return nil
}

// edit returns a deep copy of the metadata tree to change and commit.
func (h *Header) edit() object { return cloneTree(h.m.root).(object) }

// FormatOptions configure Format.
type FormatOptions struct {
	// VolumeKey is the data key, KeySize bytes with different halves.
	VolumeKey []byte
	// Passphrase opens keyslot 0 (atrest: the master key's raw bytes).
	Passphrase []byte
	// SectorSize of the data segment: 4096 (default) or 512.
	SectorSize int
	// UUID of the drive; a random one if empty.
	UUID string
	// Label of the header (at most 47 bytes), optional.
	Label string
	// AllowDiscards sets the persistent allow-discards flag.
	AllowDiscards bool
	// Token, if set, is stored bound to keyslot 0 (its Keyslots are ignored).
	Token *AtrestToken
}

// Format writes a fresh header in atrest's profile: it zeroes the header and keyslot
// area, writes keyslot 0 with the volume key wrapped by the passphrase, then both
// header copies. The device must hold the 16 MiB header area and at least one data
// sector.
func Format(dev Device, o FormatOptions) (*Header, error) {
	if o.SectorSize == 0 {
		o.SectorSize = 4096
	}
	if o.SectorSize != 512 && o.SectorSize != 4096 {
		return nil, fmt.Errorf("sector size %d (want 512 or 4096)", o.SectorSize)
	}
	if err := checkVolumeKey(o.VolumeKey); err != nil {
		return nil, err
	}
	if dev.Size() < DataOffset+int64(o.SectorSize) {
		return nil, fmt.Errorf("device of %d bytes is too small (at least %d)", dev.Size(), DataOffset+int64(o.SectorSize))
	}
	if o.UUID == "" {
		o.UUID = uuid.NewString()
	} else if _, err := uuid.Parse(o.UUID); err != nil || len(o.UUID) != 36 {
		return nil, fmt.Errorf("uuid %q is not a UUID", o.UUID)
	}
	if len(o.Label) >= labelLen {
		return nil, fmt.Errorf("label of %d bytes (at most %d)", len(o.Label), labelLen-1)
	}
	digestSalt := randomBytes(saltSize)
	digest, err := pbkdf2SHA256(o.VolumeKey, digestSalt, Iterations, 32)
	if err != nil {
		return nil, err
	}
	config := object{
		"json_size":     strconv.Itoa(HeaderSize - binHeaderSize),
		"keyslots_size": strconv.Itoa(KeyslotsSize),
	}
	if o.AllowDiscards {
		config["flags"] = []any{"allow-discards"}
	}
	root := object{
		"keyslots": object{},
		"tokens":   object{},
		"segments": object{"0": object{
			"type":        "crypt",
			"offset":      strconv.Itoa(DataOffset),
			"size":        "dynamic",
			"iv_tweak":    "0",
			"encryption":  DataCipher,
			"sector_size": jsonInt(o.SectorSize),
		}},
		"digests": object{"0": object{
			"type":       "pbkdf2",
			"keyslots":   []any{},
			"segments":   []any{"0"},
			"hash":       "sha256",
			"iterations": jsonInt(Iterations),
			"salt":       base64.StdEncoding.EncodeToString(digestSalt),
			"digest":     base64.StdEncoding.EncodeToString(digest),
		}},
		"config": config,
	}
	m, err := parseMeta(root, HeaderSize)
	if err != nil {
		panic("BUG: luks2: fresh metadata is invalid: " + err.Error())
	}
	h := &Header{hdrSize: HeaderSize, uuid: o.UUID, label: o.Label, m: m}
	rand.Read(h.salts[0][:])
	rand.Read(h.salts[1][:])
	// Old headers and keyslot material go first.
	if err := zero(dev, 0, DataOffset); err != nil {
		return nil, fmt.Errorf("wipe the header area: %w", err)
	}
	root = h.edit()
	slot, err := h.writeKeyslot(dev, root, o.VolumeKey, o.Passphrase)
	if err != nil {
		return nil, err
	}
	if o.Token != nil {
		t := *o.Token
		t.Keyslots = []int{slot}
		if err := setToken(root, &t); err != nil {
			return nil, err
		}
	}
	if err := h.commit(dev, root); err != nil {
		return nil, err
	}
	return h, nil
}

// zero writes zeroes over [off, off+n), through the device's ZeroWriter if it has one.
func zero(dev Device, off, n int64) error {
	if z, ok := dev.(blockdev.ZeroWriter); ok {
		return z.WriteZeroes(off, n, 0)
	}
	if err := blockdev.WriteZeroBuffers(dev, off, n); err != nil {
		return err
	}
	return dev.Flush()
}

func checkVolumeKey(k []byte) error {
	if len(k) != KeySize {
		return fmt.Errorf("volume key of %d bytes (want %d)", len(k), KeySize)
	}
	if bytes.Equal(k[:KeySize/2], k[KeySize/2:]) {
		return errors.New("volume key halves are equal (XTS forbids it)")
	}
	return nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// Accessors.

// UUID is the drive's LUKS UUID.
func (h *Header) UUID() string { return h.uuid }

// Label is the header's label.
func (h *Header) Label() string { return h.label }

// Seqid is the sequence number of the current header version.
func (h *Header) Seqid() uint64 { return h.seqid }

// HeaderSize is the size of one header copy.
func (h *Header) HeaderSize() int64 { return h.hdrSize }

// Segment is the data segment.
func (h *Header) Segment() Segment {
	s := *h.m.segments[h.m.segmentID()]
	s.Flags = slices.Clone(s.Flags)
	return s
}

// SegmentDigest is the digest that covers the data segment: PBKDF2 of the data key
// with its salt. Two headers with the same digest (salt and value) were made for the
// same data key.
func (h *Header) SegmentDigest() Digest {
	d := *h.m.segmentDigest()
	d.Salt, d.Value = slices.Clone(d.Salt), slices.Clone(d.Value)
	d.Keyslots, d.Segments = slices.Clone(d.Keyslots), slices.Clone(d.Segments)
	return d
}

// AllowDiscards reports the persistent allow-discards flag.
func (h *Header) AllowDiscards() bool { return slices.Contains(h.m.flags, "allow-discards") }

// Keyslots returns the keyslots, by id.
func (h *Header) Keyslots() []Keyslot {
	var r []Keyslot
	for _, id := range slices.Sorted(maps.Keys(h.m.keyslots)) {
		k := *h.m.keyslots[id]
		k.KDF.Salt = slices.Clone(k.KDF.Salt)
		r = append(r, k)
	}
	return r
}

// JSON returns the metadata as stored (compact JSON).
func (h *Header) JSON() []byte { return encodeJSON(h.m.root) }

func jsonInt(n int) any { return jsonNumber(strconv.Itoa(n)) }
