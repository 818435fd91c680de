package blockcrypt

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// FuzzDevice runs a fuzzed sequence of reads, writes, FUA writes, zeroing and trims at
// any offset and length against a plaintext model. At the end it checks the whole
// device, that nothing outside the region changed, and that every sector on the lower
// device is the pure-Go Cipher's encryption of the model (so the implementation in use
// is also compared with the pure-Go one).
//
// Input: the first byte picks the sector size (even: 4096, odd: 512); then each
// operation is 5 bytes: kind, offset (2 bytes), length (2 bytes), both reduced modulo
// the region size.
func FuzzDevice(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0x10, 0, 1, 0, 0x20, 0x10, 0x30})
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		ss := int64(4096)
		if in[0]%2 == 1 {
			ss = 512
		}
		in = in[1:]
		size := 8 * ss
		if ss == 512 {
			size = 24 * ss
		}
		const gap = 4096
		mem := blockdev.NewMem(gap + size + gap)
		const tweak = 1<<64 - 9 // the IV wraps inside the region
		d, err := New(mem, Config{Key: testKey(21), Offset: gap, SectorSize: int(ss), IVTweak: tweak, Size: size, AllowDiscards: true})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()

		model := make([]byte, size)
		known := make([]bool, size) // false after a trim: contents unspecified
		for i := range model {
			model[i] = byte(i*7 + 3)
			known[i] = true
		}
		if _, err := d.WriteAt(model, 0); err != nil {
			t.Fatal(err)
		}
		stamp := byte(1)
		for len(in) >= 5 {
			kind := in[0] % 6
			off := int64(binary.LittleEndian.Uint16(in[1:])) % (size + 1)
			n := int64(binary.LittleEndian.Uint16(in[3:])) % (size - off + 1)
			in = in[5:]
			switch kind {
			case 0, 1: // write, FUA write
				p := make([]byte, n)
				for i := range p {
					p[i] = stamp + byte(i)
				}
				stamp++
				var k int
				if kind == 0 {
					k, err = d.WriteAt(p, off)
				} else {
					k, err = d.WriteAtFUA(p, off)
				}
				if err != nil || k != len(p) {
					t.Fatalf("write(%d, %d) = %d, %v", off, n, k, err)
				}
				copy(model[off:], p)
				for i := off; i < off+n; i++ {
					known[i] = true
				}
			case 2: // write zeroes
				if err := d.WriteZeroes(off, n, 0); err != nil {
					t.Fatalf("WriteZeroes(%d, %d): %v", off, n, err)
				}
				clear(model[off : off+n])
				for i := off; i < off+n; i++ {
					known[i] = true
				}
			case 3: // trim: the whole sectors inside become unspecified
				if err := d.Trim(off, n); err != nil {
					t.Fatalf("Trim(%d, %d): %v", off, n, err)
				}
				for i := (off + ss - 1) / ss * ss; i+ss <= off+n; i += ss {
					for j := i; j < i+ss; j++ {
						known[j] = false
					}
				}
			default: // read
				p := make([]byte, n)
				if k, err := d.ReadAt(p, off); err != nil || k != len(p) {
					t.Fatalf("ReadAt(%d, %d) = %d, %v", off, n, k, err)
				}
				for i := range p {
					if known[off+int64(i)] && p[i] != model[off+int64(i)] {
						t.Fatalf("ReadAt(%d, %d): byte %d is %#x, want %#x", off, n, off+int64(i), p[i], model[off+int64(i)])
					}
				}
			}
		}

		got := make([]byte, size)
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		raw := make([]byte, mem.Size())
		mem.ReadAt(raw, 0)
		if !allZero(raw[:gap]) || !allZero(raw[gap+size:]) {
			t.Fatal("bytes outside the region changed")
		}
		ref, err := newCipherWith(genericImplementation, testKey(21))
		if err != nil {
			t.Fatal(err)
		}
		defer ref.Close()
		for s := int64(0); s < size; s += ss {
			whole := true
			for i := s; i < s+ss; i++ {
				whole = whole && known[i]
				if known[i] && got[i] != model[i] {
					t.Fatalf("final contents: byte %d is %#x, want %#x", i, got[i], model[i])
				}
			}
			if whole {
				want := make([]byte, ss)
				ref.EncryptSectors(want, model[s:s+ss], int(ss), tweak+uint64(s/512))
				if !bytes.Equal(raw[gap+s:gap+s+ss], want) {
					t.Fatalf("sector at %d: the lower device does not hold the pure-Go encryption of the model", s)
				}
			}
		}
	})
}
