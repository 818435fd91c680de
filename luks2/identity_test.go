package luks2

import (
	"bytes"
	"errors"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// TestReadUUID: the UUID comes from the primary's binary header, from the secondary's
// where the primary is wiped or garbled, and a drive that cannot be read is an I/O
// error, not "no header".
func TestReadUUID(t *testing.T) {
	dev, h, _, _ := formatMem(t, 4096)
	if got, err := ReadUUID(dev); err != nil || got != h.UUID() {
		t.Fatalf("ReadUUID: %q, %v; want %q", got, err, h.UUID())
	}

	failing := blockdev.NewFaulty(dev)
	failing.InjectError(0, binHeaderSize, blockdev.FaultRead, syscall.EIO)
	if _, err := ReadUUID(failing); !errors.Is(err, syscall.EIO) || errors.Is(err, ErrNotLUKS) {
		t.Fatalf("ReadUUID of an unreadable primary: %v, want the I/O error", err)
	}

	// A garbled primary (its version) and then a wiped one: the secondary answers.
	if _, err := dev.WriteAt([]byte{0, 9}, offVersion); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadUUID(dev); err != nil || got != h.UUID() {
		t.Fatalf("ReadUUID with a garbled primary: %q, %v", got, err)
	}
	if _, err := dev.WriteAt(make([]byte, binHeaderSize), 0); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadUUID(dev); err != nil || got != h.UUID() {
		t.Fatalf("ReadUUID with the primary wiped: %q, %v", got, err)
	}

	// Nothing left: ErrNotLUKS, also on a drive shorter than a binary header.
	if _, err := dev.WriteAt(make([]byte, HeaderSize), HeaderSize); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadUUID(dev); !errors.Is(err, ErrNotLUKS) {
		t.Fatalf("ReadUUID of a wiped drive: %v, want ErrNotLUKS", err)
	}
	if _, err := ReadUUID(blockdev.NewMem(512)); !errors.Is(err, ErrNotLUKS) {
		t.Fatalf("ReadUUID of a tiny drive: %v, want ErrNotLUKS", err)
	}
}

// TestSegmentDigest: the digest of the data segment verifies the data key, is the same
// in every load of a header, and differs between two headers of different keys.
func TestSegmentDigest(t *testing.T) {
	dev, h, vk, _ := formatMem(t, 4096)
	d := h.SegmentDigest()
	want, err := pbkdf2SHA256(vk, d.Salt, d.Iterations, len(d.Value))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(d.Value, want) || d.Type != "pbkdf2" || len(d.Segments) != 1 {
		t.Fatalf("segment digest %+v does not verify the data key", d)
	}
	h2, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if d2 := h2.SegmentDigest(); !bytes.Equal(d2.Salt, d.Salt) || !bytes.Equal(d2.Value, d.Value) {
		t.Fatal("a reload gives another segment digest")
	}
	d.Value[0] ^= 1 // a copy: the header keeps its own
	if bytes.Equal(h.SegmentDigest().Value, d.Value) {
		t.Fatal("SegmentDigest returned the header's own slice")
	}
	_, other, _, _ := formatMem(t, 4096)
	if bytes.Equal(other.SegmentDigest().Value, h.SegmentDigest().Value) {
		t.Fatal("two data keys give the same segment digest")
	}
}
