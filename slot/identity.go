package slot

import (
	"encoding/hex"
	"fmt"
	"io"

	"github.com/atrest/atrest/luks2"
)

// Identity is what makes a drive the same drive: its LUKS2 UUID and the digest of its
// data key.
type Identity struct {
	UUID string
	// Digest is the hex of the LUKS2 digest (salt and value) that covers segment 0:
	// same data key ⇔ same digest.
	Digest string
}

// Identify reads the LUKS2 header of dev (both copies as luks2.Load does) and returns
// its Identity.
func Identify(dev io.ReaderAt) (Identity, error) {
	h, err := luks2.Load(dev)
	if err != nil {
		return Identity{}, fmt.Errorf("identify the drive: %w", err)
	}
	d := h.SegmentDigest()
	return Identity{UUID: h.UUID(), Digest: hex.EncodeToString(d.Salt) + hex.EncodeToString(d.Value)}, nil
}
