package e2e

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/proc"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/nbd"
)

// The writer rule (one writer per volume) and the volume identity, end to end
// (docs/nbd.md): real `atrest serve` and `atrest mount` processes, real mounts.

// mountBackground runs `atrest mount --background ARGS... MP` and requires it to
// succeed; whatever is left of it is unmounted when the test ends (before the
// daemons started earlier are stopped).
func (c *cluster) mountBackground(mp string, args ...string) result {
	c.t.Helper()
	c.t.Cleanup(func() { umountLeftovers(c.t, c, mp) })
	r := c.run(append(append([]string{"mount", "--background"}, args...), mp)...)
	if r.code != 0 {
		c.t.Fatalf("atrest mount --background %s %s: exit %d\n%s", strings.Join(args, " "), mp, r.code, r.stderr)
	}
	return r
}

// mustUmount runs `atrest umount MP`, which must succeed.
func (c *cluster) mustUmount(mp string) {
	c.t.Helper()
	if r := c.run("umount", mp); r.code != 0 {
		c.t.Fatalf("atrest umount %s: exit %d\n%s", mp, r.code, r.stderr)
	}
}

// refusedMount runs `atrest mount --background ARGS... MP`, which must fail with the
// busy exit code and want in its output, and leave nothing on mp.
func (c *cluster) refusedMount(mp string, want []string, args ...string) result {
	c.t.Helper()
	r := c.run(append(append([]string{"mount", "--background"}, args...), mp)...)
	if r.code != exitcodes.Busy {
		c.t.Errorf("atrest mount %s: exit %d, want %d (busy)\n%s", strings.Join(args, " "), r.code, exitcodes.Busy, r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			c.t.Errorf("atrest mount %s: no %q in the output:\n%s", strings.Join(args, " "), w, r.stderr)
		}
	}
	if isMountpoint(c.t, mp) || fileExists(stateFile(mp)) {
		c.t.Errorf("the refused mount left something on %s", mp)
		umountLeftovers(c.t, c, mp)
	}
	return r
}

// TestMountOneWriter: a second `atrest mount --background` of a mounted volume, under
// the same export or as the default export "", is refused (busy) with the other mount
// point named; a writer that is not this node's mount is refused by the daemon with the
// holder named and a hint at --take-over; qemu-io, which presents no identity, gets a
// read-only connection. The first mount's files are intact and e2fsck finds the volume
// clean afterwards.
func TestMountOneWriter(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("one", "128M")) // a lone volume: also the default export ""
	mp1, mp2 := filepath.Join(c.dir, "mnt1"), filepath.Join(c.dir, "mnt2")

	c.mountBackground(mp1, "--nbd", d.uri("one"))
	sums := writeTree(t, mp1, 300)
	syncAll()

	for _, uri := range []string{d.uri("one"), d.uri("")} {
		c.refusedMount(mp2, []string{"is already mounted on " + mp1, "hint: "}, "--nbd", uri)
		c.refusedMount(mp2, []string{"is already mounted on " + mp1}, "--take-over", "--nbd", uri)
	}

	// Another writer: the daemon refuses it, naming the mount that holds the volume.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := nbd.Dial(ctx, "unix:"+d.sock, nbd.ClientOptions{Connections: 1, ReconnectTimeout: -1})
	if !errors.Is(err, nbd.ErrVolumeBusy) || !strings.Contains(err.Error(), "atrest mount "+mp1+" (pid ") {
		t.Errorf("a second writer: %v, want ErrVolumeBusy naming the mount of %s", err, mp1)
	}
	// qemu-io presents no identity: read-only, its write fails.
	r := runProg(t, "", 60*time.Second, nil, testutil.Tool(t, "qemu-io"), "-f", "raw", "-t", "none", "-c", "write -P 0x55 0 64k", d.uri("one"))
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "ermission") && !strings.Contains(r.stdout+r.stderr, "read-only") {
		t.Errorf("qemu-io write while the volume is mounted: exit %d, want a refusal\n%s%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(d.stderr.String(), "gets read-only access") {
		t.Errorf("the daemon did not log why qemu-io got read-only access:\n%s", d.stderr.String())
	}

	testutil.VerifyTree(t, mp1, sums)
	c.mustUmount(mp1)
	c.fsck(d, "one", "after the refused mounts")
}

// TestMountTakeOver: a writer that is not a mount of this node (a client of the test,
// standing for a mount elsewhere that hangs) holds the volume: `atrest mount` is
// refused with the holder named and the hint at --take-over; `atrest mount --take-over`
// says what it risks, ends the holder's connections and mounts; the holder's later
// writes fail for good and reach nothing.
func TestMountTakeOver(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("held", "96M"))
	mp := filepath.Join(c.dir, "mnt")

	// Create the file system first, then let the other writer in.
	c.mountBackground(mp, "--nbd", d.uri("held"))
	sums := writeTree(t, mp, 400)
	syncAll()
	c.mustUmount(mp)
	other := d.dialWith("held", nbd.ClientOptions{Description: "the writer elsewhere"})

	c.refusedMount(mp, []string{"the writer elsewhere", "is held by", "--take-over"}, "--nbd", d.uri("held"))

	r := c.mountBackground(mp, "--take-over", "--nbd", d.uri("held"))
	if !strings.Contains(r.stderr, "loses its connections") || !strings.Contains(r.stderr, "two ext4 mounts of one volume corrupt it") {
		t.Errorf("atrest mount --take-over did not say what it risks:\n%s", r.stderr)
	}
	if !strings.Contains(d.stderr.String(), "takes volume ") {
		t.Errorf("the daemon did not log the take-over:\n%s", d.stderr.String())
	}
	if _, err := other.WriteAt(make([]byte, 4096), 0); !errors.Is(err, nbd.ErrDisconnected) && !errors.Is(err, nbd.ErrTakenOver) {
		t.Errorf("the writer taken over writes: %v, want a failure", err)
	}
	testutil.VerifyTree(t, mp, sums)
	c.mustUmount(mp)
	c.fsck(d, "held", "after the take-over")
}

// TestMountKill9ReleasesVolume: while a mount lives, a second one through the default
// export is refused; kill -9 of the mount process ends its connections, so its hold on
// the volume: after `atrest umount` of what the crash left, the second mount gets in
// and finds the data.
func TestMountKill9ReleasesVolume(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("crash", "96M"))
	mp1, mp2 := filepath.Join(c.dir, "mnt1"), filepath.Join(c.dir, "mnt2")
	c.mountBackground(mp1, "--nbd", d.uri("crash"))
	sums := writeTree(t, mp1, 500)
	syncAll()
	c.refusedMount(mp2, []string{"is already mounted on " + mp1}, "--nbd", d.uri(""))
	pid := int(readStateFile(t, mp1)["pid"].(float64))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); !dead(pid); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the mount process survived SIGKILL")
		}
	}
	c.mustUmount(mp1)
	start := time.Now()
	c.mountBackground(mp2, "--nbd", d.uri(""))
	t.Logf("mounted again %v after the umount", time.Since(start).Round(time.Millisecond))
	testutil.VerifyTree(t, mp2, sums)
	c.mustUmount(mp2)
}

// dead reports whether process pid has exited (a zombie that nobody reaped counts).
func dead(pid int) bool {
	_, exited, err := proc.StartTime(pid)
	return err != nil || exited
}

// TestServeSharedWriters: `atrest serve --shared-writers` lets several writers in, and
// says that it is dangerous: a mount and a second writer both write.
func TestServeSharedWriters(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve("--shared-writers", c.format("shared", "64M"))
	if !strings.Contains(d.stderr.String(), "warning: --shared-writers") {
		t.Errorf("no warning about --shared-writers:\n%s", d.stderr.String())
	}
	mp := filepath.Join(c.dir, "mnt")
	c.mountBackground(mp, "--nbd", d.uri("shared"))
	// The second writer writes back what it reads: what matters is that its write is
	// let in, not what it would do to the file system.
	w := d.dial("")
	buf := make([]byte, 4096)
	if _, err := w.ReadAt(buf, w.Size()-4096); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(buf, w.Size()-4096); err != nil {
		t.Errorf("a second writer with --shared-writers: %v", err)
	}
	if err := os.WriteFile(filepath.Join(mp, "f"), []byte("mount writes too"), 0o600); err != nil {
		t.Fatal(err)
	}
	syncAll()
	c.mustUmount(mp)
}

// TestMountReconnectForeignVolume: issue 9 item 2. A mount of vol0 (the default name
// of an unnamed format); the daemon is killed; another daemon, of another keystore,
// starts on the same socket and serves another drive, also named vol0 and of the same
// size. The mount's client reconnects, finds another volume identity and writes
// nothing: I/O in the mount fails with EIO, and the foreign drive's bytes are
// unchanged.
func TestMountReconnectForeignVolume(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	format := func(c *cluster, name string) string {
		p := filepath.Join(c.dir, name)
		if out := c.must("drive", "format", "--create", "64M", p); !strings.Contains(out, "volume vol0") {
			t.Fatalf("an unnamed format is not vol0: %s", out)
		}
		return p
	}
	img := format(c, "ours.img")
	foreignCluster := newClusterIn(t, c.dir, "keystore-foreign")
	foreign := format(foreignCluster, "foreign.img")
	before := hashFile(t, foreign)

	d := c.serve(img)
	mp := filepath.Join(c.dir, "mnt")
	m := c.mount(d.uri("vol0"), mp)
	writeTree(t, mp, 600)
	syncAll()

	d.kill()
	fd := foreignCluster.serve(foreign) // the same socket, DIR/nbd.sock
	if fd.sock != d.sock {
		t.Fatalf("the foreign daemon serves %s, not %s", fd.sock, d.sock)
	}

	// Written and synced after the switch: the sync must fail, through the file system.
	err := func() error {
		f, err := os.OpenFile(filepath.Join(mp, "after"), os.O_CREATE|os.O_WRONLY|os.O_SYNC, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.Write(treeContent(700, 1<<20)); err != nil {
			return err
		}
		return f.Sync()
	}()
	// EIO from the write-back, or EROFS if ext4 met the error first in a journal commit
	// of its own and remounted itself read-only.
	if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.EROFS) {
		t.Errorf("a synced write in the mount after the switch: %v, want EIO", err)
	}
	t.Logf("a synced write in the mount after the switch: %v", err)
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(m.log.String(), "serves another volume"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the mount did not log the change of volume:\n%s", m.log.String())
		}
	}
	// The mount's last flush fails too (the foreign volume is refused): umount takes
	// the stack down and says so with the I/O exit code.
	if r := c.run("umount", mp); r.code != 0 && (r.code != exitcodes.IO || !strings.Contains(r.stderr, "unmounted "+mp)) {
		t.Errorf("atrest umount: exit %d\n%s", r.code, r.stderr)
	}
	if isMountpoint(t, mp) {
		t.Errorf("%s is still mounted after atrest umount", mp)
	}
	fd.stop()
	if after := hashFile(t, foreign); after != before {
		t.Errorf("the foreign drive changed: sha256 %s before, %s after", before, after)
	}
}
