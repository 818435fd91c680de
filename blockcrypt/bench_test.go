package blockcrypt

import (
	"crypto/aes"
	"fmt"
	"testing"

	"golang.org/x/crypto/xts"

	"github.com/atrest/atrest/blockdev"
)

// BenchmarkXTS measures every implementation and golang.org/x/crypto/xts in one run, at
// one 512-byte sector, one 4096-byte sector and 16 of them, in place:
//
//	go test -run '^$' -bench XTS ./blockcrypt
func BenchmarkXTS(b *testing.B) {
	key := testKey(30)
	for _, size := range []int{512, 4096, 64 << 10} {
		ss := 4096
		if size < 4096 {
			ss = 512
		}
		for _, op := range []string{"encrypt", "decrypt"} {
			for _, impl := range implementations {
				b.Run(fmt.Sprintf("impl=%s/op=%s/size=%d", impl.name, op, size), func(b *testing.B) {
					if !impl.available {
						b.Skipf("%s is not supported by this CPU", impl.name)
					}
					c := mustCipher(b, impl, key)
					buf := make([]byte, size)
					b.SetBytes(int64(size))
					b.ReportAllocs()
					if op == "encrypt" {
						for b.Loop() {
							c.EncryptSectors(buf, buf, ss, 1)
						}
					} else {
						for b.Loop() {
							c.DecryptSectors(buf, buf, ss, 1)
						}
					}
				})
			}
			b.Run(fmt.Sprintf("impl=xcrypto/op=%s/size=%d", op, size), func(b *testing.B) {
				c, err := xts.NewCipher(aes.NewCipher, key)
				if err != nil {
					b.Fatal(err)
				}
				crypt := c.Encrypt
				if op == "decrypt" {
					crypt = c.Decrypt
				}
				buf := make([]byte, size)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					for o := 0; o < size; o += ss {
						crypt(buf[o:o+ss], buf[o:o+ss], uint64(1+o/512))
					}
				}
			})
		}
	}
}

// BenchmarkDevice measures the Device over Mem (the best implementation) for aligned
// 4 KiB and 1 MiB writes and reads, and an unaligned 4 KiB write (two read-modify-writes);
// dev=mem is the bare Mem, the peer that shows what encryption costs.
func BenchmarkDevice(b *testing.B) {
	const size = 64 << 20
	for _, tc := range []struct {
		name string
		n    int
		skew int64
	}{{"4KiB", 4 << 10, 0}, {"1MiB", 1 << 20, 0}, {"4KiB-unaligned", 4 << 10, 100}} {
		for _, op := range []string{"write", "read"} {
			for _, dev := range []string{"blockcrypt", "mem"} {
				b.Run(fmt.Sprintf("dev=%s/op=%s/size=%s", dev, op, tc.name), func(b *testing.B) {
					var d blockdev.Device = blockdev.NewMem(size)
					if dev == "blockcrypt" {
						var err error
						d, err = New(blockdev.NewMem(size+4096), Config{Key: testKey(31), Offset: 4096})
						if err != nil {
							b.Fatal(err)
						}
					}
					defer d.Close()
					var err error
					buf := make([]byte, tc.n)
					b.SetBytes(int64(tc.n))
					b.ReportAllocs()
					off := int64(0)
					for b.Loop() {
						o := off + tc.skew
						if op == "write" {
							_, err = d.WriteAt(buf, o)
						} else {
							_, err = d.ReadAt(buf, o)
						}
						if err != nil {
							b.Fatal(err)
						}
						off += int64(tc.n)
						if off+int64(tc.n)+tc.skew > size {
							off = 0
						}
					}
				})
			}
		}
	}
}
