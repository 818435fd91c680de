package luks2

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Binary header layout (specification §2.1, figure 2). All integers are big-endian.
const (
	binHeaderSize = 4096

	offMagic     = 0
	offVersion   = 6
	offHdrSize   = 8
	offSeqid     = 16
	offLabel     = 24
	offCsumAlg   = 72
	offSalt      = 104
	offUUID      = 168
	offSubsystem = 208
	offHdrOffset = 256
	offCsum      = 448

	magicLen     = 6
	labelLen     = 48
	csumAlgLen   = 32
	saltLen      = 64
	uuidLen      = 40
	subsystemLen = 48
	csumLen      = 64
)

var (
	magicPrimary   = []byte("LUKS\xba\xbe")
	magicSecondary = []byte("SKUL\xba\xbe")
)

// hdrSizes are the header sizes (binary header + JSON area) the specification allows
// (table 1); the secondary copy starts at the header size.
var hdrSizes = []int64{
	16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304,
}

func validHdrSize(n uint64) bool {
	for _, s := range hdrSizes {
		if uint64(s) == n {
			return true
		}
	}
	return false
}

// binHeader is the decoded binary header of one copy.
type binHeader struct {
	secondary bool
	hdrSize   int64
	seqid     uint64
	label     string
	subsystem string
	uuid      string
	salt      [saltLen]byte
	hdrOffset int64
}

// cString decodes a NUL-terminated field, which must contain its terminator.
func cString(field []byte, name string) (string, error) {
	i := bytes.IndexByte(field, 0)
	if i < 0 {
		return "", fmt.Errorf("binary header field %s is not NUL-terminated", name)
	}
	return string(field[:i]), nil
}

// decodeBinary checks the fixed fields of the binary header read at offset off and
// returns them. It does not check the checksum (which needs the JSON area).
func decodeBinary(b []byte, off int64) (*binHeader, error) {
	if len(b) < binHeaderSize {
		return nil, errors.New("binary header is truncated")
	}
	h := &binHeader{secondary: off != 0}
	want := magicPrimary
	if h.secondary {
		want = magicSecondary
	}
	if !bytes.Equal(b[offMagic:offMagic+magicLen], want) {
		return nil, fmt.Errorf("bad magic %q (want %q): %w", b[offMagic:offMagic+magicLen], want, ErrNotLUKS)
	}
	if v := binary.BigEndian.Uint16(b[offVersion:]); v != 2 {
		return nil, fmt.Errorf("version %d (want 2): %w", v, ErrUnsupported)
	}
	hs := binary.BigEndian.Uint64(b[offHdrSize:])
	if !validHdrSize(hs) {
		return nil, fmt.Errorf("header size %d is not one of the sizes the specification allows", hs)
	}
	h.hdrSize = int64(hs)
	if h.secondary && off != h.hdrSize {
		return nil, fmt.Errorf("secondary header at offset %d says the header size is %d", off, hs)
	}
	h.seqid = binary.BigEndian.Uint64(b[offSeqid:])
	var err error
	if h.label, err = cString(b[offLabel:offLabel+labelLen], "label"); err != nil {
		return nil, err
	}
	alg, err := cString(b[offCsumAlg:offCsumAlg+csumAlgLen], "csum_alg")
	if err != nil {
		return nil, err
	}
	if alg != "sha256" {
		return nil, fmt.Errorf("checksum algorithm %q (atrest supports sha256): %w", alg, ErrUnsupported)
	}
	copy(h.salt[:], b[offSalt:offSalt+saltLen])
	if h.uuid, err = cString(b[offUUID:offUUID+uuidLen], "uuid"); err != nil {
		return nil, err
	}
	if h.subsystem, err = cString(b[offSubsystem:offSubsystem+subsystemLen], "subsystem"); err != nil {
		return nil, err
	}
	ho := binary.BigEndian.Uint64(b[offHdrOffset:])
	if ho != uint64(off) {
		return nil, fmt.Errorf("header offset field %d does not match its place on the device %d", ho, off)
	}
	h.hdrOffset = off
	return h, nil
}

// setChecksum stores the checksum of area in its checksum field (SHA-256 in the first
// 32 bytes, zeroes after).
func setChecksum(area []byte) {
	sum := checksum(area)
	copy(area[offCsum:], sum[:])
	clear(area[offCsum+len(sum) : offCsum+csumLen])
}

// checksum returns the SHA-256 of a whole header copy with its csum field zeroed.
func checksum(area []byte) [sha256.Size]byte {
	d := sha256.New()
	d.Write(area[:offCsum])
	d.Write(make([]byte, csumLen))
	d.Write(area[offCsum+csumLen:])
	var s [sha256.Size]byte
	d.Sum(s[:0])
	return s
}

// verifyChecksum checks the checksum of a whole header copy (binary + JSON area).
func verifyChecksum(area []byte) error {
	sum := checksum(area)
	stored := area[offCsum : offCsum+csumLen]
	if !bytes.Equal(stored[:sha256.Size], sum[:]) || !allZero(stored[sha256.Size:]) {
		return errors.New("checksum mismatch")
	}
	return nil
}

// encodeCopy builds a whole header copy: binary header, then the JSON text
// NUL-terminated and zero-padded to the JSON area, then the checksum.
func encodeCopy(h *binHeader, jsonText []byte) ([]byte, error) {
	area := make([]byte, h.hdrSize)
	if len(jsonText)+1 > len(area)-binHeaderSize {
		return nil, fmt.Errorf("metadata of %d bytes does not fit the %d-byte JSON area", len(jsonText), len(area)-binHeaderSize)
	}
	if len(h.label) >= labelLen || len(h.subsystem) >= subsystemLen || len(h.uuid) >= uuidLen {
		panic("BUG: luks2: binary header string too long")
	}
	if h.secondary {
		copy(area[offMagic:], magicSecondary)
	} else {
		copy(area[offMagic:], magicPrimary)
	}
	binary.BigEndian.PutUint16(area[offVersion:], 2)
	binary.BigEndian.PutUint64(area[offHdrSize:], uint64(h.hdrSize))
	binary.BigEndian.PutUint64(area[offSeqid:], h.seqid)
	copy(area[offLabel:], h.label)
	copy(area[offCsumAlg:], "sha256")
	copy(area[offSalt:], h.salt[:])
	copy(area[offUUID:], h.uuid)
	copy(area[offSubsystem:], h.subsystem)
	binary.BigEndian.PutUint64(area[offHdrOffset:], uint64(h.hdrOffset))
	copy(area[binHeaderSize:], jsonText)
	setChecksum(area)
	return area, nil
}

// jsonText returns the JSON text of a copy: the bytes of the JSON area before the
// first NUL, which must exist.
func jsonText(area []byte) ([]byte, error) {
	j := area[binHeaderSize:]
	i := bytes.IndexByte(j, 0)
	if i < 0 {
		return nil, errors.New("JSON area is not NUL-terminated")
	}
	return j[:i], nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
