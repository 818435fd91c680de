package discovery_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/discovery"
	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/drivebay"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/luks2/luks2test"
	"github.com/atrest/atrest/volmount"
)

// imageSize holds a LUKS2 header area and a little data.
const imageSize = luks2.DataOffset + 1<<20

// token returns an atrest token for a drive of a fresh volume.
func token() *luks2.AtrestToken {
	return &luks2.AtrestToken{
		ClusterUUID: uuid.NewString(),
		Volume:      "vol",
		VolumeUUID:  uuid.NewString(),
		MemberIndex: 0,
		MemberCount: 1,
		MasterKeyID: "mk-1",
	}
}

// newDrive makes a drive image at path (in a fresh temporary directory if path is
// "") with a LUKS2 header holding tok (none if nil), and returns its path and UUID.
func newDrive(t *testing.T, path string, tok *luks2.AtrestToken) (string, string) {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "drive.img")
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(imageSize); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dev, err := blockdev.OpenFile(path, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	key := make([]byte, luks2.KeySize)
	rand.Read(key)
	h, err := luks2.Format(dev, luks2.FormatOptions{VolumeKey: key, Passphrase: []byte("master key"), Token: tok, Label: "test"})
	if err != nil {
		t.Fatal(err)
	}
	return path, h.UUID()
}

// attach attaches a loop device over file, detached when the test ends (or when
// the returned function is called).
func attach(t *testing.T, file string) (dev string, detach func()) {
	t.Helper()
	testutil.Root(t)
	l, err := volmount.Attach(file, volmount.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	detach = func() {
		l.Release()
		if err := volmount.Detach(l.Path()); err != nil && !errors.Is(err, unix.ENXIO) {
			t.Logf("detach %s: %v", l.Path(), err)
		}
	}
	t.Cleanup(detach)
	return l.Path(), detach
}

func newScanner(t *testing.T, opts discovery.Options) *discovery.Scanner {
	t.Helper()
	s, err := discovery.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func scan(t *testing.T, s *discovery.Scanner) *discovery.Snapshot {
	t.Helper()
	snap, err := s.Scan(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// only returns the one candidate whose UUID is id, failing the test if there is not
// exactly one.
func only(t *testing.T, snap *discovery.Snapshot, id string) discovery.Candidate {
	t.Helper()
	cs := snap.ByUUID(id)
	if len(cs) != 1 {
		t.Fatalf("%d candidates with UUID %s, want 1: %s", len(cs), id, describe(snap.Candidates))
	}
	return cs[0]
}

func describe(cs []discovery.Candidate) string {
	var b strings.Builder
	for _, c := range cs {
		fmt.Fprintf(&b, "\n  %s %s %q uuid=%s dup=%v err=%v", c.Key, c.Kind, c.Paths, c.UUID, c.Duplicate, c.Err)
	}
	return b.String()
}

// TestOnlyDrivesOpened: a glob that matches a FIFO, a socket, a character device, a
// directory and a dangling link opens none of them (inotify sees no IN_OPEN for them),
// and finds the one drive among them.
func TestOnlyDrivesOpened(t *testing.T) {
	testutil.Root(t) // mknod
	dir := t.TempDir()
	_, id := newDrive(t, filepath.Join(dir, "drive.img"), token())
	if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(dir, "socket"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// A character device with /dev/null's numbers: opening it would be harmless,
	// but inotify would see it.
	if err := unix.Mknod(filepath.Join(dir, "chardev"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "subdir"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("nowhere", filepath.Join(dir, "dangling")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("fifo", filepath.Join(dir, "link-to-fifo")); err != nil {
		t.Fatal(err)
	}

	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, dir, unix.IN_OPEN); err != nil {
		t.Fatal(err)
	}

	s := newScanner(t, discovery.Options{Sources: discovery.Sources{
		Patterns: []string{dir + "/*"},
		Dirs:     []string{dir},
		// Given paths that are no drives are problems, and are not opened either.
		Paths: []string{filepath.Join(dir, "fifo"), filepath.Join(dir, "chardev")},
	}})
	snap := scan(t, s)
	if len(snap.Candidates) != 1 {
		t.Fatalf("want the one drive: %s", describe(snap.Candidates))
	}
	if c := only(t, snap, id); c.Token == nil || c.Err != nil {
		t.Errorf("the drive: token %v, err %v", c.Token, c.Err)
	}
	if len(snap.Problems) != 2 {
		t.Errorf("problems %v, want the two given paths that are no drives", snap.Problems)
	}

	opened := map[string]int{}
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(in, buf)
		if err != nil {
			break
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			opened[string(bytes.TrimRight(nameBytes, "\x00"))]++
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
	if opened["drive.img"] == 0 {
		t.Errorf("inotify saw no open of the drive (the check itself is broken): %v", opened)
	}
	delete(opened, "drive.img")
	delete(opened, "") // the directory itself, listed
	if len(opened) != 0 {
		t.Errorf("opened what is no drive: %v", opened)
	}
}

// TestLoopAndLinkCollapse: an image file, a loop device over it and a link to the
// loop device are one candidate with all three names, the given path first, then the
// link, the device node and the file.
func TestLoopAndLinkCollapse(t *testing.T) {
	img, id := newDrive(t, "", token())
	dev, _ := attach(t, img)
	links := t.TempDir()
	link := filepath.Join(links, "ata-DRIVE_SERIAL")
	if err := os.Symlink(dev, link); err != nil {
		t.Fatal(err)
	}
	src := discovery.Sources{
		Patterns: []string{links + "/*", dev},
		Dirs:     []string{filepath.Dir(img)},
	}
	c := only(t, scan(t, newScanner(t, discovery.Options{Sources: src})), id)
	if want := []string{link, dev, img}; !slices.Equal(c.Paths, want) || c.Path != link {
		t.Errorf("paths %q (preferred %s), want %q", c.Paths, c.Path, want)
	}
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	if want := discovery.Key(fmt.Sprintf("ino:%d:%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)); c.Key != want {
		t.Errorf("key %s, want %s", c.Key, want)
	}
	if c.Kind != discovery.KindLoop || c.BackingFile != img || c.Size != imageSize || c.Duplicate {
		t.Errorf("kind %s, backing %q, size %d, duplicate %v", c.Kind, c.BackingFile, c.Size, c.Duplicate)
	}

	// The image file given explicitly (as a registered path) is preferred.
	src.Paths = []string{img}
	c = only(t, scan(t, newScanner(t, discovery.Options{Sources: src})), id)
	if want := []string{img, link, dev}; !slices.Equal(c.Paths, want) {
		t.Errorf("with the image given: paths %q, want %q", c.Paths, want)
	}

	// Without the image's directory, the loop device alone still has the file's key.
	c = only(t, scan(t, newScanner(t, discovery.Options{Sources: discovery.Sources{Paths: []string{dev}}})), id)
	if c.Kind != discovery.KindLoop || !slices.Equal(c.Paths, []string{dev}) || c.BackingFile != img {
		t.Errorf("the loop device alone: kind %s, paths %q, backing %q", c.Kind, c.Paths, c.BackingFile)
	}
}

// TestAtrestViewSkipped: a loop device over a file of an atrest FUSE mount (the
// plaintext view of a volume, as `atrest mount` makes it) is never a candidate, even
// when it holds a LUKS2 header; the same header under a loop device over an image is.
func TestAtrestViewSkipped(t *testing.T) {
	testutil.LoopAndFUSE(t)
	img, id := newDrive(t, "", token())
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	mem := blockdev.NewMem(int64(len(data)))
	if _, err := mem.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	srv, err := fusefs.Mount(filepath.Join(t.TempDir(), "fuse"), []fusefs.File{{Name: "vol", Device: mem}}, fusefs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Error(err)
		}
	})
	view, _ := attach(t, srv.Path("vol"))
	drive, _ := attach(t, img)
	snap := scan(t, newScanner(t, discovery.Options{Sources: discovery.Sources{Paths: []string{view, drive}}}))
	if c := only(t, snap, id); c.Path != drive || len(snap.Candidates) != 1 {
		t.Errorf("want only %s: %s", drive, describe(snap.Candidates))
	}
}

// TestDuplicate: a header copied to a second image makes two candidates with the
// same UUID, both marked; a loop device over one of them is no third.
func TestDuplicate(t *testing.T) {
	dir := t.TempDir()
	a, id := newDrive(t, filepath.Join(dir, "a.img"), token())
	_, other := newDrive(t, filepath.Join(dir, "c.img"), token())
	data, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "b.img"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	dev, _ := attach(t, a)
	snap := scan(t, newScanner(t, discovery.Options{Sources: discovery.Sources{Dirs: []string{dir}, Paths: []string{dev}}}))
	dups := snap.ByUUID(id)
	if len(dups) != 2 || !dups[0].Duplicate || !dups[1].Duplicate || dups[0].Key == dups[1].Key {
		t.Fatalf("want two distinct duplicates: %s", describe(snap.Candidates))
	}
	if c := only(t, snap, other); c.Duplicate {
		t.Error("a drive with a UUID of its own is marked duplicate")
	}
}

// TestClasses: each reason for having no usable token is reported as its class, and
// a header with one damaged copy as a warning.
func TestClasses(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	small := write("small", []byte("not a drive"))
	zeroes := write("zeroes", make([]byte, 1<<20))
	noToken, _ := newDrive(t, filepath.Join(dir, "no-token.img"), nil)
	badTok := token()
	badTok.MemberIndex = 3
	badToken, _ := newDrive(t, filepath.Join(dir, "bad-token.img"), badTok)
	damaged, _ := newDrive(t, filepath.Join(dir, "damaged.img"), token())
	halfDamaged, halfID := newDrive(t, filepath.Join(dir, "half-damaged.img"), token())
	corrupt := func(path string, offs ...int64) {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, off := range offs {
			if _, err := f.WriteAt([]byte("garbage"), off+5000); err != nil {
				t.Fatal(err)
			}
		}
	}
	corrupt(damaged, 0, luks2.HeaderSize)
	corrupt(halfDamaged, luks2.HeaderSize)

	snap := scan(t, newScanner(t, discovery.Options{Sources: discovery.Sources{Dirs: []string{dir}}}))
	byPath := map[string]discovery.Candidate{}
	for _, c := range snap.Candidates {
		byPath[c.Path] = c
	}
	for path, want := range map[string]error{
		small:       discovery.ErrNotLUKS,
		zeroes:      discovery.ErrNotLUKS,
		noToken:     discovery.ErrNoToken,
		badToken:    discovery.ErrBadToken,
		damaged:     discovery.ErrDamaged,
		halfDamaged: nil,
	} {
		c, ok := byPath[path]
		if !ok {
			t.Errorf("%s: not found", path)
			continue
		}
		if !errors.Is(c.Err, want) || (want == nil) != (c.Token != nil) {
			t.Errorf("%s: err %v, token %v; want class %v", filepath.Base(path), c.Err, c.Token, want)
		}
	}
	if c := byPath[halfDamaged]; c.UUID != halfID || c.HeaderWarning == nil {
		t.Errorf("half-damaged: uuid %s, warning %v", c.UUID, c.HeaderWarning)
	}
	if c := byPath[noToken]; c.UUID == "" || c.Label != "test" {
		t.Errorf("no-token: uuid %q, label %q", c.UUID, c.Label)
	}
}

// TestUnsupported: a LUKS2 header that cryptsetup made outside atrest's profile is a
// drive of another program.
func TestUnsupported(t *testing.T) {
	luks2test.Cryptsetup(t)
	img := luks2test.SparseImage(t, imageSize)
	args := append([]string{"--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"}, luks2test.FastPBKDF2...)
	luks2test.Format(t, img, luks2test.KeyFile(t, []byte("passphrase")), args...)
	c := scan(t, newScanner(t, discovery.Options{Sources: discovery.Sources{Paths: []string{img}}})).Candidates
	if len(c) != 1 || !errors.Is(c[0].Err, discovery.ErrUnsupported) {
		t.Fatalf("want one candidate of class ErrUnsupported: %s", describe(c))
	}
}

// TestDeviceErrors: a drive whose header cannot be read is ErrIO; one that does not
// answer is ErrNotAnswering without stalling the scan beyond the probe timeout, and
// is not probed again while its first probe is stuck.
func TestDeviceErrors(t *testing.T) {
	bay := drivebay.Mount(t, drivebay.Options{})
	okImg, okID := newDrive(t, "", token())
	badImg, _ := newDrive(t, "", token())
	hungImg, _ := newDrive(t, "", token())
	for name, img := range map[string]string{"ok": okImg, "bad": badImg, "hung": hungImg} {
		if err := bay.Insert(name, img); err != nil {
			t.Fatal(err)
		}
	}
	var devs []string
	for _, name := range []string{"ok", "bad", "hung"} {
		dev, err := bay.Attach(name)
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, dev)
	}
	if _, err := bay.FailRange("bad", 0, 4096); err != nil {
		t.Fatal(err)
	}
	// The test holds the hung drive's loop device open, so the pull leaves it bound.
	hold, err := unix.Open(devs[2], unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(hold)
	if err := bay.Pull("hung", drivebay.PullHang); err != nil {
		t.Fatal(err)
	}
	// The stuck probe returns when the drive is released, at the latest in the
	// bay's cleanup.
	defer bay.Reinsert("hung", "back")

	const timeout = 500 * time.Millisecond
	s := newScanner(t, discovery.Options{ProbeTimeout: timeout, Sources: discovery.Sources{Paths: devs}})
	for i := range 2 {
		start := time.Now()
		snap := scan(t, s)
		took := time.Since(start)
		t.Logf("scan %d took %v", i, took)
		if c := only(t, snap, okID); c.Err != nil || c.Path != devs[0] {
			t.Errorf("the good drive: %s", describe([]discovery.Candidate{c}))
		}
		var bad, hung *discovery.Candidate
		for i, c := range snap.Candidates {
			switch c.Path {
			case devs[1]:
				bad = &snap.Candidates[i]
			case devs[2]:
				hung = &snap.Candidates[i]
			}
		}
		if bad == nil || !errors.Is(bad.Err, discovery.ErrIO) || !errors.Is(bad.Err, unix.EIO) {
			t.Errorf("the drive with a bad header block: %+v", bad)
		}
		if hung == nil || !errors.Is(hung.Err, discovery.ErrNotAnswering) {
			t.Fatalf("the hung drive: %+v", hung)
		}
		// The first scan waits for the probe timeout; the next one does not wait
		// again for the same stuck probe.
		if i == 1 && took > timeout {
			t.Errorf("the second scan took %v: it waited again for the stuck probe", took)
		}
	}
}

// TestTooMany: a directory of thousands of files is read up to Options.MaxNames and
// reported, and no descriptor is left open.
func TestTooMany(t *testing.T) {
	dir := t.TempDir()
	for i := range 3000 {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	fds := openFiles(t)
	s := newScanner(t, discovery.Options{MaxNames: 1000, Sources: discovery.Sources{Dirs: []string{dir}}})
	snap := scan(t, s)
	if n := len(snap.Candidates); n > 1000 || n < 900 {
		t.Errorf("%d candidates, want about 1000", n)
	}
	if len(snap.Problems) == 0 {
		t.Error("no problem reported for the names left out")
	}
	// A glob over all of them, with the default limit, finds them all.
	s = newScanner(t, discovery.Options{Sources: discovery.Sources{Patterns: []string{dir + "/f*"}}})
	if snap := scan(t, s); len(snap.Candidates) != 3000 || len(snap.Problems) != 0 {
		t.Errorf("%d candidates and problems %v, want 3000 and none", len(snap.Candidates), snap.Problems)
	}
	if after := openFiles(t); after > fds {
		t.Errorf("%d descriptors open after the scans, %d before", after, fds)
	}
}

func TestBadOptions(t *testing.T) {
	for _, opts := range []discovery.Options{
		{Sources: discovery.Sources{Patterns: []string{"relative/*"}}},
		{Sources: discovery.Sources{Patterns: []string{"/dev/[x"}}},
		{ProbeTimeout: -1},
	} {
		if _, err := discovery.New(opts); err == nil {
			t.Errorf("New(%+v) succeeded", opts)
		}
	}
}

func openFiles(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
