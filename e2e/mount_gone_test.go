package e2e

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/exitcodes"
)

// What `atrest umount` does when the mount's NBD server is gone, and how long the
// mount's requests wait for it (--io-timeout).

// umountBound is how long `atrest umount` of a mount whose server is gone may take:
// far below the minutes that waiting for the server's I/O took, generous for a loaded
// machine.
const umountBound = 15 * time.Second

// backgroundMount runs `atrest mount --background ARGS... --nbd URI MP` and returns the
// state file it wrote; whatever is left when the test ends is taken down.
func (c *cluster) backgroundMount(uri, mp string, args ...string) map[string]any {
	c.t.Helper()
	argv := append(append([]string{"mount", "--background"}, args...), "--nbd", uri, mp)
	if r := c.run(argv...); r.code != 0 {
		c.t.Fatalf("atrest %s: exit %d\n%s", strings.Join(argv, " "), r.code, r.stderr)
	}
	c.t.Cleanup(func() { umountLeftovers(c.t, c, mp) })
	return readStateFile(c.t, mp)
}

// processGone reports whether pid has exited (a zombie that no one reaped counts: the
// parent of a background mount returned long ago).
func processGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	return err != nil || strings.Contains(string(b), ") Z ")
}

// lostRE is how `atrest umount` counts the writes lost with an abandoned mount.
var lostRE = regexp.MustCompile(`(\d+) writes? \((\d+) bytes\) not yet flushed to the server (are|is) lost`)

// TestUmountServerGone: files written and synced through a background mount, then the
// daemon killed (-9). `atrest umount` finds the server unreachable and takes the mount
// down at once (seconds, where it waited for the server's I/O for about five minutes):
// exit code 8, a message that says the server is unreachable, that the volume was
// detached and what was lost; the mount process gone, and nothing left behind (no
// loop device over the FUSE file, no FUSE mount, no state file, the mount point
// unmounted). In the unflushed variant, ext4 is mounted nobarrier (it never sends a
// flush) and 1 MiB is written with O_DIRECT just before the kill: it reached the
// mount's NBD client and the server, and no flush made it durable, so umount counts
// at least that much lost.
func TestUmountServerGone(t *testing.T) {
	t.Parallel()
	requireMount(t)
	for _, tc := range []struct {
		name     string
		args     []string
		wantLost int64 // at least this many bytes counted lost
	}{
		{name: "synced"},
		{name: "unflushed", args: []string{"-o", "barrier=0"}, wantLost: 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := newCluster(t)
			d := c.serve(c.format("gone", "128M"))
			mp := filepath.Join(c.dir, "mnt")
			st := c.backgroundMount(d.uri("gone"), mp, tc.args...)
			pid, file := int(st["pid"].(float64)), st["file"].(string)
			writeTree(t, mp, 300)
			syncFS(t, mp)
			if tc.wantLost > 0 {
				writeDirect(t, filepath.Join(mp, "direct"), int(tc.wantLost))
			}

			d.kill()
			start := time.Now()
			r := c.run("umount", mp)
			took := time.Since(start)
			t.Logf("atrest umount with the server gone took %v:\n%s", took.Round(time.Millisecond), r.stderr)
			if took > umountBound {
				t.Errorf("atrest umount took %v with the server gone, want less than %v", took, umountBound)
			}
			if r.code != exitcodes.IO {
				t.Errorf("atrest umount: exit %d, want %d", r.code, exitcodes.IO)
			}
			for _, want := range []string{"NBD server is unreachable", "the volume on " + mp + " was detached", "not yet written out is lost"} {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("atrest umount says nothing of %q", want)
				}
			}
			m := lostRE.FindStringSubmatch(r.stderr)
			switch {
			case tc.wantLost == 0 && m == nil && !strings.Contains(r.stderr, "every write the mount had sent was flushed"):
				t.Errorf("atrest umount does not say what the mount had not flushed")
			case tc.wantLost > 0 && m == nil:
				t.Errorf("atrest umount counts no lost writes, want at least %d bytes", tc.wantLost)
			case tc.wantLost > 0:
				if n, _ := strconv.ParseInt(m[2], 10, 64); n < tc.wantLost {
					t.Errorf("atrest umount counts %d bytes lost, want at least the %d written last", n, tc.wantLost)
				}
			}
			for deadline := time.Now().Add(5 * time.Second); !processGone(pid); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the mount process %d still runs after atrest umount returned", pid)
				}
			}
			c.nothingLeft(mp, file)
			if r := c.run("umount", mp); r.code != exitcodes.Failure || !strings.Contains(r.stderr, "nothing is mounted on "+mp) {
				t.Errorf("atrest umount again: exit %d, want %d saying nothing is mounted\n%s", r.code, exitcodes.Failure, r.stderr)
			}
		})
	}
}

// TestUmountServerGoneInterrupted: Ctrl-C ends `atrest umount` while it waits for the
// mount process (stopped here, so that it cannot exit) with a message that says how to
// finish; the rerun, once the process can go on, finishes and reports what was lost.
func TestUmountServerGoneInterrupted(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("intr", "64M"))
	mp := filepath.Join(c.dir, "mnt")
	st := c.backgroundMount(d.uri("intr"), mp)
	pid, file := int(st["pid"].(float64)), st["file"].(string)
	writeTree(t, mp, 400)
	syncFS(t, mp)

	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })
	d.kill()
	cmd := exec.Command(atrestBin, "umount", mp)
	cmd.Dir, cmd.Env = c.dir, cleanEnv("ATREST_KEYSTORE="+c.ks)
	var out strings.Builder
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// The volume is detached first; then umount waits for the (stopped) process.
	for deadline := time.Now().Add(umountBound); isMountpoint(t, mp); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the volume is still mounted %v after atrest umount started", umountBound)
		}
	}
	time.Sleep(500 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("atrest umount returned (%v) while the mount process was stopped:\n%s", err, out.String())
	default:
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	var err error
	select {
	case err = <-done:
	case <-time.After(umountBound):
		cmd.Process.Kill()
		t.Fatalf("atrest umount still runs %v after Ctrl-C", umountBound)
	}
	r := resultOf(t, err, "", out.String())
	if r.code != exitcodes.Failure || !strings.Contains(r.stderr, "interrupted") || !strings.Contains(r.stderr, "atrest umount "+mp+"' again") {
		t.Errorf("atrest umount after Ctrl-C: exit %d, want %d saying it was interrupted and how to finish\n%s", r.code, exitcodes.Failure, r.stderr)
	}

	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(umountBound); !processGone(pid); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the mount process %d still runs %v after it was continued", pid, umountBound)
		}
	}
	r = c.run("umount", mp)
	if r.code != exitcodes.IO || !lostRE.MatchString(r.stderr) && !saysNothingWaiting(r.stderr) {
		t.Errorf("atrest umount again: exit %d, want %d with what was lost\n%s", r.code, exitcodes.IO, r.stderr)
	}
	c.nothingLeft(mp, file)
}

// TestMountIOTimeout: with --io-timeout 3s (recorded in the state file), a read of a
// file whose pages are not cached fails with EIO about 3 s after the daemon was
// killed, not after a minute (58 s before: the client counted from the drop, and a
// read(2) the kernel splits into several requests waited a minute for each); a second
// read fails at once. The mount logs that its requests fail until the server is back.
func TestMountIOTimeout(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("iot", "64M"))
	mp := filepath.Join(c.dir, "mnt")
	m := c.mount(d.uri("iot"), mp, "--io-timeout", "3s")
	if got := m.state()["io_timeout"]; got != "3s" {
		t.Errorf("state file io_timeout %v, want \"3s\"", got)
	}
	path := filepath.Join(mp, "f")
	if err := os.WriteFile(path, treeContent(7, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	syncFS(t, mp)
	dropCache(t, path)

	d.kill()
	read := func() (time.Duration, error) {
		start := time.Now()
		_, err := os.ReadFile(path)
		return time.Since(start), err
	}
	took, err := read()
	t.Logf("the read failed after %v: %v", took.Round(time.Millisecond), err)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read with the server gone: %v, want EIO", err)
	}
	if took < 2*time.Second || took > umountBound {
		t.Errorf("the read failed after %v, want about the 3 s of --io-timeout", took)
	}
	if took, err := read(); !errors.Is(err, syscall.EIO) || took > 2*time.Second {
		t.Errorf("second read: %v after %v, want EIO at once", err, took)
	}
	if log := m.log.String(); !strings.Contains(log, "requests fail at once until it is back") {
		t.Errorf("the mount does not log that its requests fail:\n%s", log)
	}
	file := m.fuseFile()
	start := time.Now()
	r := c.run("umount", mp)
	if took := time.Since(start); took > umountBound || r.code != exitcodes.IO {
		t.Errorf("atrest umount: exit %d after %v, want %d within %v\n%s", r.code, took, exitcodes.IO, umountBound, r.stderr)
	}
	// The mount process, whose flush failed at once, recorded what it lost before it
	// exited.
	if !lostRE.MatchString(r.stderr) && !saysNothingWaiting(r.stderr) {
		t.Errorf("atrest umount does not say what the mount had not flushed:\n%s", r.stderr)
	}
	select {
	case <-m.done:
	case <-time.After(umountBound):
		t.Fatal("atrest mount still runs after atrest umount returned")
	}
	if code := m.cmd.ProcessState.ExitCode(); code != exitcodes.IO {
		t.Errorf("atrest mount exited with %d, want %d (it lost its volume)", code, exitcodes.IO)
	}
	c.nothingLeft(mp, file)
}

// writeDirect writes n bytes (a multiple of 4096) to a new file with O_DIRECT: they
// reach the volume's NBD client, and the server, when it returns.
func writeDirect(t *testing.T, path string, n int) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_CREAT|unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE) // page-aligned
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	copy(buf, treeContent(9, n))
	if k, err := unix.Pwrite(fd, buf, 0); err != nil || k != n {
		t.Fatalf("direct write of %s: %d bytes, %v", path, k, err)
	}
}

// dropCache evicts the cached pages of a file (clean once synced), so that the next
// read goes down the stack.
func dropCache(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// saysNothingWaiting reports whether atrest umount said that no write was waiting for
// the server: an abandoned mount that had flushed everything, or one whose last flush
// failed with nothing waiting.
func saysNothingWaiting(stderr string) bool {
	return strings.Contains(stderr, "every write the mount had sent was flushed") || strings.Contains(stderr, "no write was left waiting for the server")
}
