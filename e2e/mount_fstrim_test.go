package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
)

func queueLimit(t *testing.T, loop, name string) string {
	t.Helper()
	b, err := os.ReadFile("/sys/block/" + filepath.Base(loop) + "/queue/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

var groupLine = regexp.MustCompile(`(?m)^Group \d+: `)

// waitItableZeroed waits until ext4's lazy init has zeroed the inode tables of every
// group of the file system on dev (dumpe2fs shows ITABLE_ZEROED for each).
func waitItableZeroed(t *testing.T, dev string) {
	t.Helper()
	dumpe2fs := testutil.Tool(t, "dumpe2fs")
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out := mustProg(t, "", 30*time.Second, dumpe2fs, dev)
		groups := len(groupLine.FindAllString(out, -1))
		if zeroed := strings.Count(out, "ITABLE_ZEROED"); groups > 0 && zeroed == groups {
			t.Logf("lazy init zeroed the inode tables of all %d groups", groups)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ext4's lazy init did not zero the inode tables within 30 s:\n%s", lastLines(out, 30))
		}
	}
}

// TestMountFstrim: fstrim on a mounted volume.
//   - On a drive formatted with --allow-discards, it reaches the drive as trims: the
//     drive image (a sparse file) loses allocated space, the loop device has
//     write-zeroes off (so that no zeroing was taken for a discard), and the volume is
//     intact afterwards: e2fsck finds nothing wrong with the decrypted volume, and every
//     file left reads back with its checksum after a remount.
//   - On a drive without discards, the very first fstrim is refused ("not supported")
//     and the drive image keeps its allocation.
func TestMountFstrim(t *testing.T) {
	t.Parallel()
	requireMount(t)
	fstrim := testutil.Tool(t, "fstrim")
	c := newCluster(t)
	allowed := c.format("trim", "160M", "--allow-discards")
	refused := c.format("notrim", "96M")
	d := c.serve(allowed, refused)

	t.Run("allowed", func(t *testing.T) {
		mp := filepath.Join(c.dir, "mnt-trim")
		// init_itable=0: ext4 zeroes its inode tables (lazy init, unmapping
		// WRITE_ZEROES) right away, while discards are on: they must not become trims.
		m := c.mount(d.uri("trim"), mp, "-o", "init_itable=0")
		loop := m.state()["loop"].(string)
		waitItableZeroed(t, loop)
		if wz, dm := queueLimit(t, loop, "write_zeroes_max_bytes"), queueLimit(t, loop, "discard_max_bytes"); wz != "0" || dm == "0" {
			t.Fatalf("%s: write_zeroes_max_bytes %s, discard_max_bytes %s; want write-zeroes off and discards on", loop, wz, dm)
		}
		keep := writeTree(t, filepath.Join(mp, "keep"), 300)
		writeTree(t, filepath.Join(mp, "gone"), 400)
		big := filepath.Join(mp, "gone", "big")
		if err := os.WriteFile(big, treeContent(500, 24<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		syncAll()
		if err := os.RemoveAll(filepath.Join(mp, "gone")); err != nil {
			t.Fatal(err)
		}
		syncAll()
		before := testutil.Allocated(t, allowed)
		out := mustProg(t, "", 60*time.Second, fstrim, "-v", mp)
		after := testutil.Allocated(t, allowed)
		t.Logf("%s; drive image allocation %d -> %d MiB", strings.TrimSpace(out), before>>20, after>>20)
		if after >= before-16<<20 {
			t.Errorf("fstrim freed %d bytes of the drive image, want at least the 24 MiB file removed", before-after)
		}
		m.umount()

		c.fsck(d, "trim", "after fstrim")
		m = c.mount(d.uri("trim"), mp)
		testutil.VerifyTree(t, filepath.Join(mp, "keep"), keep)
		m.umount()
	})

	t.Run("refused", func(t *testing.T) {
		mp := filepath.Join(c.dir, "mnt-notrim")
		m := c.mount(d.uri("notrim"), mp)
		sums := writeTree(t, mp, 600)
		syncAll()
		if err := os.Remove(filepath.Join(mp, "d1", "s1", "f7-3145728")); err != nil {
			t.Fatal(err)
		}
		delete(sums, filepath.Join("d1", "s1", "f7-3145728"))
		syncAll()
		before := testutil.Allocated(t, refused)
		r := runProg(t, "", 60*time.Second, nil, fstrim, "-v", mp)
		if r.code == 0 || !strings.Contains(r.stderr, "not supported") {
			t.Errorf("the first fstrim on a drive without discards: exit %d, want it refused as not supported\n%s%s", r.code, r.stdout, r.stderr)
		}
		if after := testutil.Allocated(t, refused); after != before {
			t.Errorf("a refused fstrim changed the drive image's allocation: %d -> %d", before, after)
		}
		testutil.VerifyTree(t, mp, sums)
		m.umount()
	})
}
