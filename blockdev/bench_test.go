package blockdev_test

// Throughput of File against its peer in the same run: *os.File's ReadAt and WriteAt on
// the same file (Go's own pread/pwrite loop). Compare the ratio, not the figures: the
// machine is shared.
//
//	go test -run '^$' -bench 'BenchmarkFile' -benchtime 2s ./blockdev

import (
	"fmt"
	"io"
	"os"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

const benchFileSize = 64 << 20

type benchTarget struct {
	name string
	open func(b *testing.B, path string, direct bool) (io.ReaderAt, io.WriterAt, func())
}

var benchTargets = []benchTarget{
	{"atrest", func(b *testing.B, path string, direct bool) (io.ReaderAt, io.WriterAt, func()) {
		f, err := blockdev.OpenFile(path, blockdev.FileOptions{Direct: direct})
		if err != nil {
			b.Fatal(err)
		}
		return f, f, func() { f.Close() }
	}},
	{"os.File", func(b *testing.B, path string, direct bool) (io.ReaderAt, io.WriterAt, func()) {
		flags := os.O_RDWR
		if direct {
			flags |= syscall.O_DIRECT
		}
		f, err := os.OpenFile(path, flags, 0)
		if err != nil {
			b.Fatal(err)
		}
		return f, f, func() { f.Close() }
	}},
}

func benchFile(b *testing.B, direct, write bool) {
	dir := ""
	if direct {
		var err error
		if dir, err = os.MkdirTemp("/var/tmp", "atrest-bench-"); err != nil {
			b.Skip(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
	}
	if dir == "" {
		dir = b.TempDir()
	}
	path := dir + "/drive.img"
	if err := os.WriteFile(path, make([]byte, benchFileSize), 0o600); err != nil {
		b.Fatal(err)
	}
	for _, size := range []int{4 << 10, 1 << 20} {
		for _, target := range benchTargets {
			b.Run(fmt.Sprintf("%s/%dKiB/%s", map[bool]string{false: "buffered", true: "direct"}[direct], size>>10, target.name), func(b *testing.B) {
				r, w, done := target.open(b, path, direct)
				defer done()
				buf := blockdev.AlignedBuffer(size)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				off := int64(0)
				for b.Loop() {
					var err error
					if write {
						_, err = w.WriteAt(buf, off)
					} else {
						_, err = r.ReadAt(buf, off)
					}
					if err != nil {
						b.Fatal(err)
					}
					off = (off + int64(size)) % benchFileSize
				}
			})
		}
	}
}

func BenchmarkFileRead(b *testing.B)        { benchFile(b, false, false) }
func BenchmarkFileWrite(b *testing.B)       { benchFile(b, false, true) }
func BenchmarkFileDirectRead(b *testing.B)  { benchFile(b, true, false) }
func BenchmarkFileDirectWrite(b *testing.B) { benchFile(b, true, true) }
