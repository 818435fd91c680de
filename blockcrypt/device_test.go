package blockcrypt

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// newTestDevice returns a Device over a fresh Mem with the region at offset 2 sectors and
// 2 sectors of lower device after it, so that writes outside the region would show.
func newTestDevice(t testing.TB, impl *implementation, sectorSize int, sectors int64, tweak uint64) (*Device, *blockdev.Mem) {
	t.Helper()
	ss := int64(sectorSize)
	lower := blockdev.NewMem((sectors + 4) * ss)
	d, err := newDevice(lower, Config{
		Key:        testKey(9),
		Offset:     2 * ss,
		Size:       sectors * ss,
		SectorSize: sectorSize,
		IVTweak:    tweak,
	}, impl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, lower
}

func TestNewErrors(t *testing.T) {
	lower := blockdev.NewMem(1 << 20)
	good := Config{Key: testKey(1)}
	weak := testKey(1)
	copy(weak[32:], weak[:32])
	for _, tc := range []struct {
		name string
		cfg  Config
		want error
		msg  string
	}{
		{"short key", Config{Key: make([]byte, 32)}, ErrKeySize, "32 bytes"},
		{"no key", Config{}, ErrKeySize, "0 bytes"},
		{"equal halves", Config{Key: weak}, ErrWeakKey, "equal"},
		{"sector size 1024", Config{Key: good.Key, SectorSize: 1024}, ErrSectorSize, "1024"},
		{"sector size -1", Config{Key: good.Key, SectorSize: -1}, ErrSectorSize, "-1"},
		{"unaligned offset", Config{Key: good.Key, Offset: 512}, ErrRegion, "offset 512"},
		{"negative offset", Config{Key: good.Key, Offset: -4096}, ErrRegion, "offset -4096"},
		{"unaligned size", Config{Key: good.Key, Size: 4097}, ErrRegion, "size 4097"},
		{"negative size", Config{Key: good.Key, Size: -4096}, ErrRegion, "size -4096"},
		{"offset past the end", Config{Key: good.Key, Offset: 2 << 20}, ErrRegion, "past the end"},
		{"nothing after offset", Config{Key: good.Key, Offset: 1 << 20}, ErrRegion, "no whole"},
		{"region too long", Config{Key: good.Key, Offset: 4096, Size: 1 << 20}, ErrRegion, "does not fit"},
		{"512 region too long", Config{Key: good.Key, SectorSize: 512, Size: 1<<20 + 512}, ErrRegion, "does not fit"},
	} {
		_, err := New(lower, tc.cfg)
		if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: err = %v, want %v mentioning %q", tc.name, err, tc.want, tc.msg)
		}
	}
	if _, err := New(nil, good); err == nil {
		t.Error("nil lower device accepted")
	}
	// The lower device stays usable after a refusal.
	if _, err := lower.WriteAt([]byte{1}, 0); err != nil {
		t.Errorf("lower device unusable after New failed: %v", err)
	}
	// Size 0 means to the end, rounded down to a whole sector.
	odd := blockdev.NewMem(3*4096 + 100)
	d, err := New(odd, Config{Key: testKey(1), Offset: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if d.Size() != 2*4096 || d.PreferredBlockSize() != 4096 {
		t.Errorf("Size %d PreferredBlockSize %d, want 8192 and 4096", d.Size(), d.PreferredBlockSize())
	}
	d.Close()
	d, err = New(blockdev.NewMem(3*4096+100), Config{Key: testKey(1), SectorSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	if d.Size() != 3*4096 || d.PreferredBlockSize() != 512 {
		t.Errorf("Size %d PreferredBlockSize %d, want 12288 and 512", d.Size(), d.PreferredBlockSize())
	}
	d.Close()
}

// TestDeviceCiphertext checks what lands on the lower device: each sector encrypted with
// the IV IVTweak + (region offset)/512, nothing outside the region touched, and the
// caller's buffer left alone.
func TestDeviceCiphertext(t *testing.T) {
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		for _, ss := range []int{512, 4096} {
			const sectors = 40
			d, lower := newTestDevice(t, impl, ss, sectors, 1000)
			rng := rand.New(rand.NewPCG(10, uint64(ss)))
			plain := make([]byte, sectors*ss)
			fillRandom(rng, plain)
			p := bytes.Clone(plain)
			if n, err := d.WriteAt(p, 0); n != len(p) || err != nil {
				t.Fatalf("WriteAt: %d, %v", n, err)
			}
			if !bytes.Equal(p, plain) {
				t.Fatal("WriteAt changed the caller's buffer")
			}
			raw := make([]byte, lower.Size())
			lower.ReadAt(raw, 0)
			if !allZero(raw[:2*ss]) || !allZero(raw[(2+sectors)*ss:]) {
				t.Fatal("bytes outside the region changed")
			}
			c := mustCipher(t, impl, testKey(9))
			for k := range sectors {
				want := make([]byte, ss)
				c.EncryptSectors(want, plain[k*ss:(k+1)*ss], ss, 1000+uint64(k*ss/512))
				if !bytes.Equal(raw[(2+k)*ss:(3+k)*ss], want) {
					t.Fatalf("sector size %d: sector %d has the wrong ciphertext", ss, k)
				}
			}
			got := make([]byte, len(plain))
			if n, err := d.ReadAt(got, 0); n != len(got) || err != nil {
				t.Fatalf("ReadAt: %d, %v", n, err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("read back differs")
			}
		}
	})
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// TestDeviceModel compares random reads and writes of any offset and length with a
// plaintext model, at both sector sizes (FuzzDevice does the same with fuzzed input).
func TestDeviceModel(t *testing.T) {
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		for _, ss := range []int{512, 4096} {
			d, _ := newTestDevice(t, impl, ss, 24, 77)
			rng := rand.New(rand.NewPCG(11, uint64(ss)))
			model := make([]byte, d.Size())
			// The region starts as zero ciphertext, which reads as noise: fill it first.
			fillRandom(rng, model)
			if _, err := d.WriteAt(model, 0); err != nil {
				t.Fatal(err)
			}
			for i := range 1000 {
				off := rng.Int64N(d.Size())
				n := rng.Int64N(min(d.Size()-off, int64(3*ss)) + 1)
				if rng.IntN(2) == 0 {
					p := make([]byte, n)
					fillRandom(rng, p)
					if k, err := d.WriteAt(p, off); k != int(n) || err != nil {
						t.Fatalf("op %d: WriteAt(%d, %d) = %d, %v", i, off, n, k, err)
					}
					copy(model[off:], p)
				} else {
					p := make([]byte, n)
					if k, err := d.ReadAt(p, off); k != int(n) || err != nil {
						t.Fatalf("op %d: ReadAt(%d, %d) = %d, %v", i, off, n, k, err)
					}
					if !bytes.Equal(p, model[off:off+n]) {
						t.Fatalf("op %d: ReadAt(%d, %d) differs from the model", i, off, n)
					}
				}
			}
			got := make([]byte, d.Size())
			d.ReadAt(got, 0)
			if !bytes.Equal(got, model) {
				t.Fatal("final contents differ from the model")
			}
		}
	})
}

func TestDeviceEdges(t *testing.T) {
	d, _ := newTestDevice(t, genericImplementation, 4096, 4, 0)
	size := d.Size()
	buf := make([]byte, 100)
	if n, err := d.ReadAt(buf, size-50); n != 50 || err != io.EOF {
		t.Errorf("read across the end: %d, %v; want 50, io.EOF", n, err)
	}
	if n, err := d.ReadAt(buf, size); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v; want 0, io.EOF", n, err)
	}
	if n, err := d.ReadAt(nil, size); n != 0 || err != nil {
		t.Errorf("empty read at the end: %d, %v; want 0, nil", n, err)
	}
	if _, err := d.ReadAt(buf, -1); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("read at -1: %v", err)
	}
	if n, err := d.WriteAt(buf, size-50); n != 0 || !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("write across the end: %d, %v; want 0, ErrOutOfRange", n, err)
	}
	if _, err := d.WriteAt(buf, -1); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("write at -1: %v", err)
	}
	if n, err := d.WriteAt(nil, size); n != 0 || err != nil {
		t.Errorf("empty write at the end: %d, %v", n, err)
	}
	if err := d.WriteZeroes(size-10, 20, 0); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("zeroes across the end: %v", err)
	}
}

func TestDeviceWriteZeroes(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		d, lower := newTestDevice(t, genericImplementation, ss, 600, 5)
		rng := rand.New(rand.NewPCG(12, 0))
		model := make([]byte, d.Size())
		fillRandom(rng, model)
		d.WriteAt(model, 0)
		before := make([]byte, lower.Size())
		lower.ReadAt(before, 0)
		if err := d.WriteZeroes(100, 10000, blockdev.ZeroFast); !errors.Is(err, blockdev.ErrNotFast) {
			t.Fatalf("ZeroFast: %v, want ErrNotFast", err)
		}
		after := make([]byte, lower.Size())
		lower.ReadAt(after, 0)
		if !bytes.Equal(before, after) {
			t.Fatal("a refused ZeroFast changed the device")
		}
		// Longer than the zero buffer, unaligned at both ends.
		off, n := int64(ss/2+3), d.Size()-int64(ss)
		if err := d.WriteZeroes(off, n, blockdev.ZeroMayUnmap); err != nil {
			t.Fatal(err)
		}
		clear(model[off : off+n])
		got := make([]byte, d.Size())
		d.ReadAt(got, 0)
		if !bytes.Equal(got, model) {
			t.Fatalf("sector size %d: contents after WriteZeroes differ", ss)
		}
		// The zeroes are encrypted: the lower device holds no run of zero sectors.
		lower.ReadAt(after, 0)
		region := after[2*ss : int64(2*ss)+d.Size()]
		for k := 0; k < len(region); k += ss {
			if allZero(region[k : k+ss]) {
				t.Fatalf("sector %d is zero ciphertext", k/ss)
			}
		}
	}
}

func TestDeviceTrim(t *testing.T) {
	lower := blockdev.NewMem(64 * 4096)
	d, err := New(lower, Config{Key: testKey(3), Offset: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Trim(0, 4096); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Errorf("Trim without AllowDiscards: %v, want ErrNotSupported", err)
	}
	if err := blockdev.Trim(d, 0, 4096); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Errorf("blockdev.Trim without AllowDiscards: %v, want ErrNotSupported", err)
	}

	lower = blockdev.NewMem(64 * 4096)
	d, err = New(lower, Config{Key: testKey(3), Offset: 4096, AllowDiscards: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	model := make([]byte, d.Size())
	fillRandom(rand.New(rand.NewPCG(13, 0)), model)
	d.WriteAt(model, 0)
	// Trim from inside sector 1 to inside sector 5: sectors 2..4 go, 1 and 5 stay.
	if err := d.Trim(4096+10, 4*4096); err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, lower.Size())
	lower.ReadAt(raw, 0)
	for k := range d.Size() / 4096 {
		zero := allZero(raw[4096+k*4096 : 4096+(k+1)*4096])
		if zero != (k >= 2 && k <= 4) {
			t.Errorf("sector %d: trimmed on the lower device = %v", k, zero)
		}
	}
	got := make([]byte, d.Size())
	d.ReadAt(got, 0)
	if !bytes.Equal(got[:2*4096], model[:2*4096]) || !bytes.Equal(got[5*4096:], model[5*4096:]) {
		t.Error("Trim changed bytes outside the whole sectors it covers")
	}
	if err := d.Trim(10, 100); err != nil {
		t.Errorf("Trim inside one sector: %v", err)
	}
	if err := d.Trim(0, d.Size()+1); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("Trim past the end: %v", err)
	}
}

func TestDeviceReadOnly(t *testing.T) {
	lower := blockdev.NewMem(16 * 4096)
	d, err := New(lower, Config{Key: testKey(4), ReadOnly: true, AllowDiscards: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt(make([]byte, 10), 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("WriteAt: %v", err)
	}
	if _, err := d.WriteAtFUA(make([]byte, 10), 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("WriteAtFUA: %v", err)
	}
	if err := d.WriteZeroes(0, 10, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("WriteZeroes: %v", err)
	}
	if err := d.Trim(0, 4096); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("Trim: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 10), 0); err != nil {
		t.Errorf("ReadAt: %v", err)
	}
}

func TestDeviceClose(t *testing.T) {
	lower := blockdev.NewMem(16 * 4096)
	d, err := New(lower, Config{Key: testKey(4)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := lower.ReadAt(make([]byte, 1), 0); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("lower device not closed: %v", err)
	}
	if d.c.x != nil {
		t.Error("the Cipher's keys survive Close")
	}
	checks := map[string]error{
		"Close":       d.Close(),
		"Flush":       d.Flush(),
		"Trim":        d.Trim(0, 1),
		"WriteZeroes": d.WriteZeroes(0, 1, 0),
	}
	_, checks["ReadAt"] = d.ReadAt(make([]byte, 1), 0)
	_, checks["WriteAt"] = d.WriteAt(make([]byte, 1), 0)
	_, checks["WriteAtFUA"] = d.WriteAtFUA(make([]byte, 1), 0)
	for name, err := range checks {
		if !errors.Is(err, blockdev.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
}

// TestConcurrentPartialWrites has many goroutines write disjoint pieces of the same few
// sectors, each piece on its own, while a whole-sector writer rewrites the middle sector
// and readers check that no byte they read is anything but its old or its new value.
// Every partial write must survive (run with -race).
func TestConcurrentPartialWrites(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		d, _ := newTestDevice(t, genericImplementation, ss, 3, 0)
		size := int(d.Size())
		if _, err := d.WriteAt(make([]byte, size), 0); err != nil {
			t.Fatal(err)
		}
		const writers, piece = 16, 8
		// Writer w owns the pieces k with k%writers == w and writes each once, with
		// the value w+1; before that the piece holds zeroes.
		want := func(i int) byte { return byte((i/piece)%writers + 1) }
		var wg sync.WaitGroup
		stop := make(chan struct{})
		var readers sync.WaitGroup
		for r := range 2 {
			readers.Go(func() {
				buf := make([]byte, ss)
				for k := 0; ; k++ {
					select {
					case <-stop:
						return
					default:
					}
					off := (k % 3) * ss
					if _, err := d.ReadAt(buf, int64(off)); err != nil {
						t.Error(err)
						return
					}
					for i, b := range buf {
						if b != 0 && b != want(off+i) {
							t.Errorf("reader %d: byte %d is %d: a torn sector", r, off+i, b)
							return
						}
					}
				}
			})
		}
		for w := range writers {
			wg.Go(func() {
				p := bytes.Repeat([]byte{byte(w + 1)}, piece)
				for i := w * piece; i < size; i += writers * piece {
					if _, err := d.WriteAt(p, int64(i)); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		// The whole-sector writer writes what the partial writers will have
		// written to the middle sector, so that any order of the two ends the same;
		// an RMW that wrote back a stale sector over it would lose pieces.
		mid := make([]byte, ss)
		for i := range mid {
			mid[i] = want(ss + i)
		}
		wg.Go(func() {
			for range 20 {
				if _, err := d.WriteAt(mid, int64(ss)); err != nil {
					t.Error(err)
					return
				}
			}
		})
		wg.Wait()
		close(stop)
		readers.Wait()
		got := make([]byte, size)
		d.ReadAt(got, 0)
		for i, b := range got {
			if b != want(i) {
				t.Fatalf("sector size %d: byte %d is %d, want %d: a partial write was lost", ss, i, b, want(i))
			}
		}
	}
}
