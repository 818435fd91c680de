package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/testutil"
)

// TestMountRoundTrip is the main evidence for `atrest mount`: on a freshly formatted
// drive served by `atrest serve`, the first mount creates ext4 (READY=1 only once it is
// mounted), a tree of files written and synced survives `atrest umount` (which takes
// the whole stack down) and a second mount (--background this time, which must not
// format again), with every checksum intact. The drive image holds none of the
// plaintext markers written through the mount, while the same scan finds them in the
// decrypted export.
func TestMountRoundTrip(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	img := c.format("rt", "128M")
	d := c.serve(img)
	mp := filepath.Join(c.dir, "mnt")

	m := c.mount(d.uri("rt"), mp, "-o", "noatime")
	if log := m.log.String(); !strings.Contains(log, "created ext4 and mounted") {
		t.Errorf("the first mount of a fresh volume did not say it created ext4:\n%s", log)
	}
	st := m.state()
	if st["mountpoint"] != mp || st["loop"] == "" || st["fuse_dir"] != filepath.Dir(m.fuseFile()) {
		t.Errorf("state file: %v", st)
	}
	if !strings.HasPrefix(m.fuseFile(), "/run/atrest/fuse/") {
		t.Errorf("FUSE file %s is not under /run/atrest/fuse", m.fuseFile())
	}
	if dio, err := os.ReadFile("/sys/block/" + filepath.Base(st["loop"].(string)) + "/loop/dio"); err != nil || strings.TrimSpace(string(dio)) != "1" {
		t.Errorf("loop device without direct I/O: %q, %v", dio, err)
	}
	sums := writeTree(t, mp, 100)
	syncAll()
	m.umount()

	// The drive holds ciphertext only; the decrypted export holds the markers.
	drive, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if n := markers(drive); n != 0 {
		t.Fatalf("the drive image holds %d plaintext markers", n)
	}
	plain := markers(readAll(t, d.dialReader("rt")))
	want := 0
	for _, size := range mountTreeSizes {
		want += (size + 4095 - len(plainMarker) - 8) / 4096
	}
	if plain < want {
		t.Fatalf("the decrypted export holds %d markers, want at least %d: the scan of the drive proves nothing", plain, want)
	}
	t.Logf("plaintext markers: %d in the decrypted export, 0 on the drive", plain)

	// Again, in the background: it returns once mounted, and keeps nothing of ours
	// (its output goes to syslog from then on).
	start := time.Now()
	r := c.run("mount", "--background", "--nbd", d.uri("rt"), mp)
	if r.code != 0 {
		t.Fatalf("atrest mount --background: exit %d\n%s", r.code, r.stderr)
	}
	t.Logf("atrest mount --background returned after %v", time.Since(start).Round(time.Millisecond))
	if !isMountpoint(t, mp) {
		t.Fatal("atrest mount --background returned before the volume was mounted")
	}
	if strings.Contains(r.stderr, "created") {
		t.Errorf("the second mount created a file system over the first:\n%s", r.stderr)
	}
	t.Cleanup(func() { umountLeftovers(t, c, mp) })
	bg := readStateFile(t, mp)
	pid := int(bg["pid"].(float64))
	file := bg["file"].(string)
	testutil.VerifyTree(t, mp, sums)

	if r := c.run("umount", mp); r.code != 0 {
		t.Fatalf("atrest umount of the background mount: exit %d\n%s", r.code, r.stderr)
	}
	// Its parent returned long ago: whoever reaps orphans here may leave it a zombie.
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && !strings.Contains(string(b), ") Z ") {
		t.Errorf("the background mount process %d still runs after atrest umount: %s", pid, b)
	}
	c.nothingLeft(mp, file)
	if r := c.run("umount", mp); r.code != exitcodes.Failure || !strings.Contains(r.stderr, "nothing is mounted on "+mp) {
		t.Errorf("atrest umount with nothing mounted: exit %d, want %d saying so\n%s", r.code, exitcodes.Failure, r.stderr)
	}
}
