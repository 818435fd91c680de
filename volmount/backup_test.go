package volmount

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/testutil"
)

// TestMakeFSRefusesDamagedExt4: an ext4 file system whose primary superblock is gone
// reads as nothing to blkid, but its backup superblocks remain (e2fsck -b recovers
// it); MakeFS refuses to format over it, for every block size.
func TestMakeFSRefusesDamagedExt4(t *testing.T) {
	mkfs := testutil.Tool(t, "mkfs.ext4")
	testutil.Tool(t, "blkid")
	for _, bs := range []int{1024, 2048, 4096} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			img := image(t, 300<<20)
			if out, err := exec.Command(mkfs, "-q", "-F", "-b", fmt.Sprint(bs), img).CombinedOutput(); err != nil {
				t.Fatalf("mkfs.ext4: %v\n%s", err, out)
			}
			f, err := os.OpenFile(img, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			_, err = f.WriteAt(make([]byte, 64<<10), 0) // the primary superblock and group descriptors
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if sig, err := Probe(img); err != nil || !sig.Empty() {
				t.Fatalf("Probe of the damaged file system = %v, %v; want nothing (the case this guards)", sig, err)
			}
			err = MakeFS(img, "ext4", MkfsOptions{})
			if !errors.Is(err, ErrNotEmpty) || !strings.Contains(err.Error(), "backup superblock") {
				t.Errorf("MakeFS over a damaged ext4 = %v, want ErrNotEmpty naming the backup superblock", err)
			}
		})
	}
	// A device too small for group 1, and one of noise, are formatted.
	small := image(t, 8<<20)
	if err := MakeFS(small, "ext4", MkfsOptions{}); err != nil {
		t.Errorf("MakeFS of a small empty device: %v", err)
	}
	noise := image(t, 200<<20)
	f, err := os.OpenFile(noise, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(content(77, 4<<20), 128<<20) // where a 4 KiB-block backup would be
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := MakeFS(noise, "ext4", MkfsOptions{}); err != nil {
		t.Errorf("MakeFS of a device of noise: %v", err)
	}
}
