package e2e

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/exitcodes"
)

// refused runs `atrest serve` that must fail: exit status code, msg in its output, no
// READY=1, no socket left, and not a byte of the drive images changed.
func (c *cluster) refused(code int, msg string, images []string, o spawnOpts) {
	t := c.t
	t.Helper()
	before := map[string]string{}
	for _, img := range images {
		before[img] = hashFile(t, img)
	}
	_, err := os.Lstat(c.sockPath(o))
	sockBefore := err == nil
	d := c.spawn(o)
	r := d.wait(60 * time.Second)
	if r.code != code || !strings.Contains(r.stderr, msg) {
		t.Errorf("exit %d (want %d), output (want %q):\n%s", r.code, code, msg, r.stderr)
	}
	if !strings.HasPrefix(r.stderr, "atrest") || strings.Contains(r.stderr, "panic") || strings.Contains(r.stderr, "goroutine ") {
		t.Errorf("not a clean error message:\n%s", r.stderr)
	}
	if d.notify.has("READY=1") {
		t.Error("READY=1 sent by a daemon that failed")
	}
	if _, err := os.Lstat(d.sock); err == nil && d.ownsSocket && !sockBefore {
		t.Errorf("socket %s left behind", d.sock)
	}
	for img, h := range before {
		if hashFile(t, img) != h {
			t.Errorf("%s changed", img)
		}
	}
}

// TestServeErrors: what `atrest serve` says and returns for each mistake an
// administrator can make, with the exit codes of internal/exitcodes; it never touches
// a drive when it refuses.
func TestServeErrors(t *testing.T) {
	t.Parallel()
	t.Run("foreign-drive", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		mine := c.format("mine", "32M")
		other := newClusterIn(t, c.dir, "other-keystore")
		foreign := other.format("foreign", "32M")
		c.refused(exitcodes.Key, "is not a member of this cluster", []string{mine, foreign}, spawnOpts{args: []string{mine, foreign}})
	})
	t.Run("stale-keystore", func(t *testing.T) {
		// A keystore restored from a backup taken before a rotation: same cluster,
		// old master key.
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		stale := filepath.Join(c.dir, "stale-keystore")
		copyDir(t, c.ks, stale)
		c.must("rotate-encryption-keys")
		c.refused(exitcodes.Key, "does not open", []string{img}, spawnOpts{args: []string{"--keystore", stale, img}})
	})
	t.Run("no-keystore", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		c.refused(exitcodes.Keystore, "no keystore", []string{img}, spawnOpts{args: []string{"--keystore", filepath.Join(c.dir, "nowhere"), img}})
	})
	t.Run("unsafe-keystore", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		if err := os.Chmod(filepath.Join(c.ks, "master.key"), 0o644); err != nil {
			t.Fatal(err)
		}
		c.refused(exitcodes.Keystore, "chmod 0600", []string{img}, spawnOpts{args: []string{img}})
	})
	t.Run("missing-drive", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		gone := filepath.Join(c.dir, "gone.img")
		c.refused(exitcodes.DriveMissing, gone, []string{img}, spawnOpts{args: []string{img, gone}})
	})
	t.Run("missing-registered-drive", func(t *testing.T) {
		// No drives named: serve those the keystore knows; one of them is gone.
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		gone := c.format("gone", "32M")
		if err := os.Remove(gone); err != nil {
			t.Fatal(err)
		}
		c.refused(exitcodes.DriveMissing, gone, []string{img}, spawnOpts{})
	})
	t.Run("glob-matches-nothing", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		c.refused(exitcodes.DriveMissing, `no drive matches "`+filepath.Join(c.dir, "*.nothing")+`"`, []string{img},
			spawnOpts{args: []string{filepath.Join(c.dir, "*.img"), filepath.Join(c.dir, "*.nothing")}})
	})
	t.Run("not-luks", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		junk := filepath.Join(c.dir, "junk.img")
		if err := os.WriteFile(junk, bytes.Repeat([]byte("not a drive "), 3<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		c.refused(exitcodes.Header, "no LUKS2 header", []string{junk}, spawnOpts{args: []string{junk}})
	})
	t.Run("bad-listen", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		c.refused(exitcodes.Usage, `--listen "127.0.0.1:10809"`, []string{img}, spawnOpts{raw: true, args: []string{"--listen", "127.0.0.1:10809", img}})
	})
	t.Run("socket-in-use", func(t *testing.T) {
		// A second daemon on the socket of a live one must not take it over.
		t.Parallel()
		c := newCluster(t)
		a := c.format("a", "32M")
		b := c.format("b", "32M")
		live := c.serve(a)
		// A control socket of its own, so that what refuses it is the NBD socket; the
		// control socket it took first is removed again.
		ctl := filepath.Join(c.dir, "second.ctl")
		c.refused(exitcodes.Busy, "another server answers", []string{a, b}, spawnOpts{args: []string{b}, env: []string{"ATREST_CONTROL=" + ctl}})
		if _, err := os.Lstat(ctl); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the refused daemon left its control socket %s: %v", ctl, err)
		}
		if _, err := os.Lstat(live.sock); err != nil {
			t.Fatalf("the live daemon's socket is gone: %v", err)
		}
		cl := live.dial("a")
		if _, err := cl.ReadAt(make([]byte, 4096), 0); err != nil {
			t.Fatalf("the live daemon no longer answers: %v", err)
		}
		cl.Close()
		live.stop()
	})
	t.Run("tcp-port-in-use", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		c.refused(exitcodes.Busy, "address already in use", []string{img},
			spawnOpts{args: []string{"--listen", "tcp:" + l.Addr().String(), img}})
	})
	t.Run("same-drive-twice", func(t *testing.T) {
		// The same drive under two names would be opened twice.
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		link := filepath.Join(c.dir, "link.img")
		if err := os.Symlink(img, link); err != nil {
			t.Fatal(err)
		}
		c.refused(exitcodes.Usage, "are the same drive", []string{img}, spawnOpts{args: []string{img, link}})
	})
	t.Run("same-volume-twice", func(t *testing.T) {
		// A copy of a drive holds the same volume.
		t.Parallel()
		c := newCluster(t)
		img := c.format("vol", "32M")
		dup := filepath.Join(c.dir, "copy.img")
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dup, b, 0o600); err != nil {
			t.Fatal(err)
		}
		c.refused(exitcodes.Usage, `both hold volume "vol"`, []string{img, dup}, spawnOpts{args: []string{img, dup}})
	})
}

// copyDir copies the regular files of a keystore directory, root's alone as the
// keystore requires (directory 0700, files 0600).
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Mkdir(to, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
