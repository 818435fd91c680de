package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
	"golang.org/x/sys/unix"
)

// probe wraps a real Device and records what reaches it: the calls the FUSE layer makes
// are what these tests check.
type probe struct {
	blockdev.Device

	slowZero bool          // WriteZeroes with ZeroFast answers ErrNotFast (like an encrypted device)
	delay    time.Duration // added to every read, so that concurrent requests overlap

	mu          sync.Mutex
	zeroes      []zeroCall
	flushes     int
	maxReq      int
	inflight    int
	maxInflight int
	failRead    error
	failWrite   error
	failFlush   error
}

type zeroCall struct {
	off, n int64
	flags  blockdev.ZeroFlags
}

var (
	_ blockdev.Device     = (*probe)(nil)
	_ blockdev.ZeroWriter = (*probe)(nil)
)

func newProbe(size int64) *probe { return &probe{Device: blockdev.NewMem(size)} }

func (p *probe) enter(n int) {
	p.mu.Lock()
	p.inflight++
	p.maxInflight = max(p.maxInflight, p.inflight)
	p.maxReq = max(p.maxReq, n)
	p.mu.Unlock()
}

func (p *probe) leave() {
	p.mu.Lock()
	p.inflight--
	p.mu.Unlock()
}

func (p *probe) ReadAt(b []byte, off int64) (int, error) {
	p.enter(len(b))
	defer p.leave()
	if p.delay > 0 {
		time.Sleep(p.delay)
	}
	p.mu.Lock()
	err := p.failRead
	p.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return p.Device.ReadAt(b, off)
}

func (p *probe) WriteAt(b []byte, off int64) (int, error) {
	p.enter(len(b))
	defer p.leave()
	p.mu.Lock()
	err := p.failWrite
	p.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return p.Device.WriteAt(b, off)
}

func (p *probe) WriteZeroes(off, n int64, flags blockdev.ZeroFlags) error {
	p.mu.Lock()
	p.zeroes = append(p.zeroes, zeroCall{off, n, flags})
	p.mu.Unlock()
	if p.slowZero && flags&blockdev.ZeroFast != 0 {
		return blockdev.ErrNotFast
	}
	return blockdev.WriteZeroes(p.Device, off, n, flags)
}

func (p *probe) Flush() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.flushes++
	return p.failFlush
}

// counters returns the flushes, the largest request and the most requests in flight
// seen so far.
func (p *probe) counters() (flushes, maxReq, maxInflight int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.flushes, p.maxReq, p.maxInflight
}

func (p *probe) takeZeroes() []zeroCall {
	p.mu.Lock()
	defer p.mu.Unlock()
	z := p.zeroes
	p.zeroes = nil
	return z
}

// logBuffer collects log output written by the serving goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// requireFUSE skips (fails in CI) unless the test can mount FUSE file systems.
func requireFUSE(t testing.TB) {
	t.Helper()
	testutil.Root(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Unavailable(t, "/dev/fuse is missing: %v", err)
	}
}

// mount mounts files in a fresh directory and unmounts them when the test ends.
func mount(t *testing.T, opts Options, files ...File) *Server {
	t.Helper()
	requireFUSE(t)
	s, err := Mount(filepath.Join(t.TempDir(), "fuse"), files, opts)
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
			return
		}
		s.Wait()
	})
	return s
}

func openT(t *testing.T, path string, flag int) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func random(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestReadWrite(t *testing.T) {
	const size = 8 << 20
	vol, odd := newProbe(size), newProbe(1<<20+512)
	s := mount(t, Options{}, File{"vol", vol}, File{"odd", odd})

	entries, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 || entries[0].Name() != "odd" || entries[1].Name() != "vol" {
		t.Fatalf("directory holds %v, want odd and vol", entries)
	}
	for name, want := range map[string]int64{"vol": size, "odd": 1<<20 + 512} {
		fi, err := os.Stat(s.Path(name))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Size() != want || fi.Mode() != 0o600 || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s: size %d mode %v uid %d gid %d; want size %d, mode -rw-------, root", name, fi.Size(), fi.Mode(), st.Uid, st.Gid, want)
		}
	}
	if s.Path("nope") != "" {
		t.Errorf("Path of an unknown name = %q, want empty", s.Path("nope"))
	}

	f := openT(t, s.Path("vol"), os.O_RDWR)
	// A write reaches the Device before it returns.
	data := random(1<<20+4096, 1)
	if n, err := f.WriteAt(data, 12345); n != len(data) || err != nil {
		t.Fatalf("WriteAt = %d, %v", n, err)
	}
	got := make([]byte, len(data))
	if _, err := vol.Device.ReadAt(got, 12345); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the device does not hold what was written (err %v)", err)
	}
	// A change below is visible at once: nothing is cached above.
	fresh := random(4096, 2)
	if _, err := vol.Device.WriteAt(fresh, 12345); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(got[:4096], 12345); err != nil || !bytes.Equal(got[:4096], fresh) {
		t.Fatalf("read after a change on the device returned stale data (err %v)", err)
	}

	// Reads at and across the end.
	buf := make([]byte, 8192)
	if n, err := f.ReadAt(buf, size); n != 0 || err != io.EOF {
		t.Errorf("read at the end = %d, %v; want 0, EOF", n, err)
	}
	if n, err := f.ReadAt(buf, size+1<<20); n != 0 || err != io.EOF {
		t.Errorf("read after the end = %d, %v; want 0, EOF", n, err)
	}
	if n, err := f.ReadAt(buf, size-4096); n != 4096 || err != io.EOF {
		t.Errorf("read across the end = %d, %v; want 4096, EOF", n, err)
	}
	// Writes at and across the end: the file never grows.
	if n, err := f.WriteAt(buf, size); n != 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write at the end = %d, %v; want 0, ENOSPC", n, err)
	}
	// pwrite(2) directly: os.File.WriteAt drops the count of a short write.
	tail := random(8192, 3)
	if n, err := unix.Pwrite(int(f.Fd()), tail, size-4096); n != 4096 || err != nil {
		t.Errorf("write across the end = %d, %v; want 4096 (short write)", n, err)
	}
	if _, err := vol.Device.ReadAt(got[:4096], size-4096); err != nil || !bytes.Equal(got[:4096], tail[:4096]) {
		t.Errorf("the part of the write that fits did not land (err %v)", err)
	}
	if fi, _ := f.Stat(); fi.Size() != size {
		t.Errorf("size after writes at the end = %d, want %d", fi.Size(), size)
	}

	// The odd-sized file ends mid-sector.
	g := openT(t, s.Path("odd"), os.O_RDWR)
	if n, err := g.ReadAt(buf, 1<<20); n != 512 || err != io.EOF {
		t.Errorf("read across the end of odd = %d, %v; want 512, EOF", n, err)
	}
}

func TestNoPageCache(t *testing.T) {
	vol := newProbe(4 << 20)
	s := mount(t, Options{}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	if _, err := f.Write(random(2<<20, 4)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(io.NewSectionReader(f, 0, 4<<20)); err != nil {
		t.Fatal(err)
	}
	var cs unix.Cachestat_t
	if err := unix.Cachestat(uint(f.Fd()), &unix.CachestatRange{Off: 0, Len: 0}, &cs, 0); err != nil {
		testutil.Unavailable(t, "cachestat(2): %v", err)
	}
	if cs.Cache != 0 || cs.Dirty != 0 {
		t.Errorf("after buffered reads and writes the page cache holds %d pages (%d dirty) of the FUSE file, want none", cs.Cache, cs.Dirty)
	}
}

func TestRequestSize(t *testing.T) {
	vol := newProbe(8 << 20)
	var logs logBuffer
	s := mount(t, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR|syscall.O_DIRECT)
	buf := alignedBuffer(4 << 20)
	if _, err := f.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if _, maxReq, _ := vol.counters(); maxReq != DefaultMaxWrite {
		t.Errorf("largest request reaching the device = %d bytes, want %d (MaxWrite)", maxReq, DefaultMaxWrite)
	}
	// Full-size reads are answered without complaint (go-fuse's splice of a 1 MiB
	// reply failed on the pipe size and logged a warning for each one).
	if log := logs.String(); log != "" {
		t.Errorf("1 MiB reads logged: %s", log)
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		if strings.Contains(line, " "+s.Dir()+" ") {
			if !strings.Contains(line, "max_read=1048576") || !strings.Contains(line, "fuse.atrest") {
				t.Errorf("mountinfo line lacks max_read=1048576 or fuse.atrest: %s", line)
			}
			return
		}
	}
	t.Errorf("%s not in /proc/self/mountinfo", s.Dir())
}

func TestSetattr(t *testing.T) {
	s := mount(t, Options{}, File{"vol", newProbe(1 << 20)})
	p := s.Path("vol")
	for _, c := range []struct {
		what string
		err  error
		want error
	}{
		{"grow", os.Truncate(p, 2<<20), syscall.EFBIG},
		{"shrink", os.Truncate(p, 4096), syscall.EPERM},
		{"same size", os.Truncate(p, 1<<20), nil},
		{"chmod", os.Chmod(p, 0o644), syscall.EPERM},
		{"chown", os.Chown(p, 1000, 1000), syscall.EPERM},
		{"times", os.Chtimes(p, time.Now(), time.Now()), nil},
	} {
		if !errors.Is(c.err, c.want) && !(c.want == nil && c.err == nil) {
			t.Errorf("%s: %v, want %v", c.what, c.err, c.want)
		}
	}
	if f, err := os.OpenFile(p, os.O_RDWR|os.O_TRUNC, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("open with O_TRUNC: %v, want EPERM", err)
		if f != nil {
			f.Close()
		}
	}
	if fi, err := os.Stat(p); err != nil || fi.Size() != 1<<20 {
		t.Errorf("size after the attempts: %v %v, want 1 MiB", fi, err)
	}
}

func TestFsync(t *testing.T) {
	vol := newProbe(1 << 20)
	var logs logBuffer
	s := mount(t, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	before, _, _ := vol.counters()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if after, _, _ := vol.counters(); after-before != 2 {
		t.Errorf("fsync + fdatasync reached the device as %d flushes, want 2", after-before)
	}
	vol.mu.Lock()
	vol.failFlush = errors.New("cache battery gone")
	vol.mu.Unlock()
	if err := f.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync on a failing flush: %v, want EIO", err)
	}
	if !strings.Contains(logs.String(), "cache battery gone") || !strings.Contains(logs.String(), "op=flush") {
		t.Errorf("the flush error was not logged: %q", logs.String())
	}
}

func TestFallocate(t *testing.T) {
	const size = 1 << 20
	// Devices that trim, so that holes reach them.
	fastT, slowT := &trimProbe{probe: newProbe(size)}, &trimProbe{probe: newProbe(size)}
	fast, slow := fastT.probe, slowT.probe
	slow.slowZero = true
	s := mount(t, Options{}, File{"fast", fastT}, File{"slow", slowT})
	ff := openT(t, s.Path("fast"), os.O_RDWR)
	fs := openT(t, s.Path("slow"), os.O_RDWR)
	fill := bytes.Repeat([]byte{0xA5}, size)
	zero := make([]byte, 8192)

	check := func(what string, p *probe, off int64, wantZero bool) {
		t.Helper()
		got := make([]byte, 8192)
		if _, err := p.Device.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if isZero := bytes.Equal(got, zero); isZero != wantZero {
			t.Errorf("%s: range reads zero = %v, want %v", what, isZero, wantZero)
		}
	}
	for _, p := range []*probe{fast, slow} {
		if _, err := p.Device.WriteAt(fill, 0); err != nil {
			t.Fatal(err)
		}
	}
	const (
		keep  = unix.FALLOC_FL_KEEP_SIZE
		punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
		zr    = unix.FALLOC_FL_ZERO_RANGE
	)
	for _, c := range []struct {
		what      string
		f         *os.File
		mode      uint32
		off, n    int64
		want      error
		wantCalls []zeroCall
	}{
		{"allocate inside", ff, 0, 0, size, nil, nil},
		{"allocate beyond", ff, 0, 4096, size, syscall.EFBIG, nil},
		{"allocate beyond, keep size", ff, keep, 4096, size, nil, nil},
		{"punch hole", ff, punch, 8192, 8192, nil, []zeroCall{{8192, 8192, blockdev.ZeroMayUnmap | blockdev.ZeroFast}}},
		{"punch hole across the end", ff, punch, size - 4096, 1 << 20, nil, []zeroCall{{size - 4096, 4096, blockdev.ZeroMayUnmap | blockdev.ZeroFast}}},
		{"punch hole after the end", ff, punch, size, 4096, nil, nil},
		{"zero range", ff, zr, 65536, 8192, nil, []zeroCall{{65536, 8192, 0}}},
		{"zero range beyond", ff, zr, size - 4096, 8192, syscall.EFBIG, nil},
		{"zero range beyond, keep size", ff, zr | keep, size - 4096, 8192, nil, []zeroCall{{size - 4096, 4096, 0}}},
		{"collapse range", ff, unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096, syscall.EOPNOTSUPP, nil},
		{"punch hole, slow zeroing", fs, punch, 8192, 8192, syscall.EOPNOTSUPP, []zeroCall{{8192, 8192, blockdev.ZeroMayUnmap | blockdev.ZeroFast}}},
		{"zero range, slow zeroing", fs, zr, 65536, 8192, nil, []zeroCall{{65536, 8192, 0}}},
	} {
		p := fast
		if c.f == fs {
			p = slow
		}
		p.takeZeroes()
		err := unix.Fallocate(int(c.f.Fd()), c.mode, c.off, c.n)
		if !errors.Is(err, c.want) && !(err == nil && c.want == nil) {
			t.Errorf("%s: %v, want %v", c.what, err, c.want)
		}
		if got := p.takeZeroes(); fmt.Sprint(got) != fmt.Sprint(c.wantCalls) {
			t.Errorf("%s: device got WriteZeroes %v, want %v", c.what, got, c.wantCalls)
		}
	}
	check("punched hole", fast, 8192, true)
	check("zeroed range", fast, 65536, true)
	check("untouched range", fast, 32768, false)
	check("hole refused on the slow device", slow, 8192, false)
	check("zeroed range on the slow device", slow, 65536, true)
	if fi, _ := ff.Stat(); fi.Size() != size {
		t.Errorf("size after fallocate = %d, want %d", fi.Size(), size)
	}
}

// TestPunchHoleWithoutTrim: a Device whose Caps do not say Trim gets no holes, not even
// as zeroings (it zeroes fast: only its Caps keep the hole away).
func TestPunchHoleWithoutTrim(t *testing.T) {
	vol := newProbe(1 << 20)
	if c := blockdev.CapsOf(vol); c.Trim || !c.FastZero {
		t.Fatalf("the probe's Caps %+v: want FastZero, no Trim", c)
	}
	s := mount(t, Options{}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
	if !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Errorf("punch hole on a device without Trim: %v, want EOPNOTSUPP", err)
	}
	if z := vol.takeZeroes(); len(z) != 0 {
		t.Errorf("punch hole on a device without Trim reached the device: %v", z)
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 0, 4096); err != nil {
		t.Errorf("zero range on a device without Trim: %v", err)
	}
}

func TestDeviceErrors(t *testing.T) {
	vol := newProbe(1 << 20)
	var logs logBuffer
	s := mount(t, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	buf := make([]byte, 4096)

	vol.mu.Lock()
	vol.failRead = errors.New("medium error")
	vol.failWrite = fmt.Errorf("write to drive: %w", blockdev.ErrReadOnly)
	vol.mu.Unlock()
	if _, err := f.ReadAt(buf, 4096); !errors.Is(err, syscall.EIO) {
		t.Errorf("read on a failing device: %v, want EIO", err)
	}
	if _, err := f.WriteAt(buf, 4096); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write on a read-only device: %v, want EROFS", err)
	}
	// The classes of blockdev reach the kernel as the block layer's errnos.
	for _, c := range []struct {
		err   error
		errno syscall.Errno
	}{
		{fmt.Errorf("drive: %w: %w", blockdev.ErrMedium, syscall.EBADMSG), syscall.EIO},
		{fmt.Errorf("drive: %w: %w", blockdev.ErrGone, syscall.EIO), syscall.ENODEV},
		{fmt.Errorf("drive: %w", blockdev.ErrTimeout), syscall.ETIMEDOUT},
	} {
		vol.mu.Lock()
		vol.failRead = c.err
		vol.mu.Unlock()
		if _, err := f.ReadAt(buf, 4096); !errors.Is(err, c.errno) {
			t.Errorf("read failing with %v: %v, want %v", c.err, err, c.errno)
		}
	}
	log := logs.String()
	for _, want := range []string{"medium error", "op=read", "offset=4096", "file=vol", "read-only"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q: %q", want, log)
		}
	}
}

func TestStatfs(t *testing.T) {
	s := mount(t, Options{}, File{"a", newProbe(1 << 20)}, File{"b", newProbe(3 << 20)})
	var st unix.Statfs_t
	if err := unix.Statfs(s.Dir(), &st); err != nil {
		t.Fatal(err)
	}
	if st.Bsize != 4096 || st.Blocks != (4<<20)/4096 {
		t.Errorf("statfs: bsize %d blocks %d, want 4096 and %d", st.Bsize, st.Blocks, (4<<20)/4096)
	}
	fi, err := os.Stat(s.Dir())
	if err != nil || fi.Mode() != os.ModeDir|0o700 {
		t.Errorf("directory mode %v (%v), want drwx------", fi.Mode(), err)
	}
}

// TestConcurrentIO has goroutines read and write their own regions at once (run it
// with -race).
func TestConcurrentIO(t *testing.T) {
	const workers, region = 8, 1 << 20
	vol := newProbe(workers * region)
	s := mount(t, Options{}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			base := int64(w * region)
			got := make([]byte, 64<<10)
			for i := range 16 {
				data := random(64<<10, uint64(w*100+i))
				off := base + int64(i%16)*(64<<10)
				if _, err := f.WriteAt(data, off); err != nil {
					errs <- err
					return
				}
				if _, err := f.ReadAt(got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, data) {
					errs <- fmt.Errorf("worker %d: read back differs at %d", w, off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestAsyncDirectIO checks that aio direct reads reach the device in parallel: without
// CAP_ASYNC_DIO the kernel would complete each one before it sends the next.
func TestAsyncDirectIO(t *testing.T) {
	fio := testutil.Tool(t, "fio")
	vol := newProbe(64 << 20)
	vol.delay = 2 * time.Millisecond
	s := mount(t, Options{}, File{"vol", vol})
	out, err := runFio(fio, "--name=qd", "--filename="+s.Path("vol"), "--rw=randread", "--bs=4k",
		"--direct=1", "--ioengine=libaio", "--iodepth=32", "--numjobs=1", "--size=64m",
		"--io_size=16m", "--runtime=20")
	if err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	_, _, inflight := vol.counters()
	if inflight < 8 {
		t.Errorf("at most %d reads reached the device at once with fio at depth 32, want at least 8", inflight)
	}
	t.Logf("max reads in flight at the device: %d", inflight)
}

// TestFioVerify writes random blocks of mixed sizes through the FUSE file with direct
// I/O and has fio verify every one with crc32c, over memory, a File drive and
// blockcrypt over a File drive.
func TestFioVerify(t *testing.T) {
	fio := testutil.Tool(t, "fio")
	const size = 64 << 20
	fileDrive := func(t *testing.T) blockdev.Device {
		p := filepath.Join(t.TempDir(), "drive.img")
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size+16<<20); err != nil {
			t.Fatal(err)
		}
		d, err := blockdev.OpenFile(p, blockdev.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	for _, c := range []struct {
		name string
		dev  func(t *testing.T) blockdev.Device
	}{
		{"mem", func(t *testing.T) blockdev.Device { return blockdev.NewMem(size) }},
		{"file", fileDrive},
		{"encrypted file", func(t *testing.T) blockdev.Device {
			lower := fileDrive(t)
			d, err := blockcrypt.New(lower, blockcrypt.Config{Key: random(blockcrypt.KeySize, 9), Offset: 16 << 20})
			if err != nil {
				lower.Close()
				t.Fatal(err)
			}
			return d
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dev := c.dev(t)
			t.Cleanup(func() { dev.Close() })
			s := mount(t, Options{}, File{"vol", dev})
			out, err := runFio(fio, "--name=verify", "--filename="+s.Path("vol"), "--rw=randwrite",
				"--bsrange=4k-1m", "--direct=1", "--ioengine=libaio", "--iodepth=16", "--size=64m",
				"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0")
			if err != nil {
				t.Fatalf("fio: %v\n%s", err, out)
			}
			if !strings.Contains(out, "err= 0") {
				t.Errorf("fio reports errors:\n%s", out)
			}
		})
	}
}

// runFio runs fio without a verify state file (fio writes local-*-verify.state into
// its working directory, here the package's).
func runFio(fio string, args ...string) (string, error) {
	out, err := exec.Command(fio, append([]string{"--verify_state_save=0"}, args...)...).CombinedOutput()
	return string(out), err
}

// alignedBuffer returns n bytes aligned for O_DIRECT.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+4096)
	off := int(uintptr(unsafe.Pointer(&b[0])) & 4095)
	if off != 0 {
		off = 4096 - off
	}
	return b[off : off+n]
}

func TestUnmountWhileOpen(t *testing.T) {
	requireFUSE(t)
	s, err := Mount(filepath.Join(t.TempDir(), "fuse"), []File{{"vol", newProbe(1 << 20)}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(s.Path("vol"))
	if err != nil {
		s.Unmount()
		t.Fatal(err)
	}
	if err := s.Unmount(); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("Unmount with the file open: %v, want EBUSY", err)
	}
	f.Close()
	if err := s.Unmount(); err != nil {
		t.Fatalf("Unmount after close: %v", err)
	}
	done := make(chan struct{})
	go func() { s.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after Unmount")
	}
	if err := s.Unmount(); err != nil {
		t.Errorf("second Unmount: %v", err)
	}
}

func TestUnmountedFromOutside(t *testing.T) {
	requireFUSE(t)
	s, err := Mount(filepath.Join(t.TempDir(), "fuse"), []File{{"vol", newProbe(1 << 20)}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(s.Dir(), 0); err != nil {
		s.Unmount()
		t.Fatal(err)
	}
	// At once, while the serve loop may still be running: the kernel answers EINVAL
	// (no longer a mount point) and Unmount waits for the loop to end.
	start := time.Now()
	if err := s.Unmount(); err != nil {
		t.Errorf("Unmount after umount(2) from outside: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Unmount after umount(2) from outside took %v", d)
	}
	s.Wait()
}

func TestMountErrors(t *testing.T) {
	dir := t.TempDir()
	dev := blockdev.NewMem(4096)
	for _, c := range []struct {
		files []File
		want  string
	}{
		{nil, "no files"},
		{[]File{{"", dev}}, "invalid file name"},
		{[]File{{"..", dev}}, "invalid file name"},
		{[]File{{"a/b", dev}}, "contains '/'"},
		{[]File{{strings.Repeat("x", 256), dev}}, "longer than 255"},
		{[]File{{"a", dev}, {"a", dev}}, "given twice"},
		{[]File{{"a", nil}}, "has no device"},
	} {
		_, err := Mount(dir, c.files, Options{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Mount(%v): %v, want an error with %q", c.files, err, c.want)
		}
	}
}

// TestCloseOnExec checks that no /dev/fuse descriptor leaks into programs this process
// starts, which would keep a mount alive after its server died.
func TestCloseOnExec(t *testing.T) {
	mount(t, Options{}, File{"vol", newProbe(4096)})
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, e := range entries {
		if target, _ := os.Readlink("/proc/self/fd/" + e.Name()); target != "/dev/fuse" {
			continue
		}
		found++
		fd, _ := strconv.Atoi(e.Name())
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err != nil || flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("/dev/fuse descriptor %d: flags %#x (%v), want FD_CLOEXEC", fd, flags, err)
		}
	}
	if found == 0 {
		t.Error("no /dev/fuse descriptor found: the test checks nothing")
	}
}

// The I/O flusher test runs this test binary again with ioFlusherEnv set: it calls
// EnsureIOFlusher (which re-executes it once more) and reports the flag of several
// threads.
const ioFlusherEnv = "FUSEFS_IOFLUSHER_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(ioFlusherEnv) != "" {
		os.Exit(ioFlusherChild())
	}
	os.Exit(m.Run())
}

func ioFlusherChild() int {
	if err := EnsureIOFlusher(); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	// Threads the runtime starts from here on, and locked goroutines on them.
	var wg sync.WaitGroup
	flags := make([]int, 8)
	for i := range flags {
		wg.Go(func() {
			runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
			flags[i], _ = unix.PrctlRetInt(unix.PR_GET_IO_FLUSHER, 0, 0, 0, 0)
		})
	}
	wg.Wait()
	fmt.Println("flags", flags, "reexec", os.Getenv(reexecEnv))
	return 0
}

// hasCap reports whether the process has capability c in its effective set.
func hasCap(t *testing.T, c uint) bool {
	t.Helper()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

func TestEnsureIOFlusher(t *testing.T) {
	testutil.Root(t)
	if !hasCap(t, unix.CAP_SYS_RESOURCE) {
		// Some containers drop CAP_SYS_RESOURCE even for root: then the error must say so.
		err := EnsureIOFlusher()
		if !errors.Is(err, syscall.EPERM) || !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
			t.Errorf("EnsureIOFlusher without CAP_SYS_RESOURCE = %v, want EPERM naming the capability", err)
		}
		t.Log("no CAP_SYS_RESOURCE here: only the refusal was checked")
		return
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), ioFlusherEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "flags [1 1 1 1 1 1 1 1] reexec 1" {
		t.Errorf("child reports %q, want every thread flagged after one re-exec", got)
	}
}
