package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/mountinfo"
	"github.com/atrest/atrest/internal/testutil"
)

// Helpers of the `atrest mount` / `atrest umount` tests (mount_*_test.go).

// requireMount skips (fails in CI) unless loop devices, FUSE and the programs that
// `atrest mount` runs are there.
func requireMount(t *testing.T) {
	t.Helper()
	testutil.LoopAndFUSE(t, "blkid", "mount", "mkfs.ext4", "systemd-escape")
}

// mounted is a running `atrest mount` in the foreground.
type mounted struct {
	t      *testing.T
	c      *cluster
	mp     string
	cmd    *exec.Cmd
	log    *logFile
	notify *notifySocket
	done   chan struct{}
}

// mount starts `atrest mount --nbd URI ARGS... MP` under a fake notify socket and waits
// for READY=1, which it sends only once the file system is mounted. When the test ends,
// whatever is left is taken down with `atrest umount` (the process killed first if
// it does not stop).
func (c *cluster) mount(uri, mp string, args ...string) *mounted {
	t := c.t
	t.Helper()
	m := &mounted{t: t, c: c, mp: mp, log: newLogFile(t, c.dir), notify: newNotifySocket(t, c.dir), done: make(chan struct{})}
	argv := append([]string{"mount", "--nbd", uri}, args...)
	m.cmd = exec.Command(atrestBin, append(argv, mp)...)
	m.cmd.Dir = c.dir
	m.cmd.Env = cleanEnv("ATREST_KEYSTORE="+c.ks, "NOTIFY_SOCKET="+m.notify.path)
	m.cmd.Stdout, m.cmd.Stderr = m.log.f, m.log.f
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.cmd.Wait(); close(m.done) }()
	t.Cleanup(func() {
		if !m.exited() {
			if r := c.run("umount", mp); r.code != 0 {
				t.Errorf("cleanup: atrest umount %s: exit %d\n%s", mp, r.code, r.stderr)
			}
			select {
			case <-m.done:
			case <-time.After(30 * time.Second):
				m.cmd.Process.Kill()
				<-m.done
			}
		}
		umountLeftovers(t, c, mp)
		if t.Failed() {
			t.Logf("atrest mount %s (pid %d) output:\n%s", mp, m.cmd.Process.Pid, m.log.String())
		}
	})
	timeout := time.NewTimer(60 * time.Second)
	defer timeout.Stop()
	for !m.notify.has("READY=1") {
		select {
		case <-m.notify.arrived:
		case <-m.done:
			t.Fatalf("atrest mount exited (%v) before READY=1:\n%s", m.cmd.ProcessState, m.log.String())
		case <-timeout.C:
			t.Fatalf("atrest mount sent no READY=1 within 60 s (states %q):\n%s", m.notify.all(), m.log.String())
		}
	}
	if !isMountpoint(t, mp) {
		t.Fatalf("READY=1 came before %s was mounted", mp)
	}
	return m
}

// fsck fails the test unless `e2fsck -fn` finds the decrypted volume of export (read
// through d, which must not be mounted meanwhile) a clean file system.
func (c *cluster) fsck(d *daemon, export, when string) {
	c.t.Helper()
	e2fsck := testutil.Tool(c.t, "e2fsck")
	vol := filepath.Join(c.dir, export+"-volume.img")
	if err := os.WriteFile(vol, readAll(c.t, d.dialReader(export)), 0o600); err != nil {
		c.t.Fatal(err)
	}
	defer os.Remove(vol)
	if r := runProg(c.t, "", 60*time.Second, nil, e2fsck, "-fn", vol); r.code != 0 {
		c.t.Errorf("e2fsck -fn of the decrypted volume %s: exit %d\n%s%s", when, r.code, r.stdout, r.stderr)
	}
}

// umountLeftovers runs `atrest umount` if the test left anything of a stack behind.
func umountLeftovers(t *testing.T, c *cluster, mp string) {
	if isMountpoint(t, mp) || fileExists(stateFile(mp)) {
		c.run("umount", mp)
	}
}

func (m *mounted) exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// umount runs `atrest umount` and checks that it took everything down: the mount
// process exited 0, no mount, no loop device over the FUSE file, no FUSE mount, no
// state file.
func (m *mounted) umount() {
	m.t.Helper()
	file := m.fuseFile()
	r := m.c.run("umount", m.mp)
	if r.code != 0 {
		m.t.Fatalf("atrest umount %s: exit %d\n%s%s", m.mp, r.code, r.stdout, r.stderr)
	}
	select {
	case <-m.done:
	case <-time.After(10 * time.Second):
		m.t.Fatalf("atrest mount still runs after atrest umount returned:\n%s", m.log.String())
	}
	if code := m.cmd.ProcessState.ExitCode(); code != 0 {
		m.t.Fatalf("atrest mount exited with %d after atrest umount:\n%s", code, m.log.String())
	}
	if strings.Contains(m.log.String(), "DATA RACE") {
		m.t.Fatalf("the race detector found a race in atrest mount:\n%s", m.log.String())
	}
	m.c.nothingLeft(m.mp, file)
}

// nothingLeft fails the test if anything of the stack of mp (FUSE file file) remains.
func (c *cluster) nothingLeft(mp, file string) {
	c.t.Helper()
	if isMountpoint(c.t, mp) {
		c.t.Errorf("%s is still mounted", mp)
	}
	if loops := loopsOver(c.t, file); len(loops) > 0 {
		c.t.Errorf("loop devices %v still attached to %s", loops, file)
	}
	if dir := filepath.Dir(file); isMountpoint(c.t, dir) {
		c.t.Errorf("the FUSE mount %s is still there", dir)
	} else if strings.HasPrefix(dir, "/run/atrest/fuse/") && fileExists(dir) {
		c.t.Errorf("the FUSE directory %s was left behind", dir)
	}
	if fileExists(stateFile(mp)) {
		c.t.Errorf("state file %s left behind", stateFile(mp))
	}
}

// state returns what the mount recorded for `atrest umount`.
func (m *mounted) state() map[string]any {
	m.t.Helper()
	return readStateFile(m.t, m.mp)
}

func readStateFile(t *testing.T, mp string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(stateFile(mp))
	if err != nil {
		t.Fatalf("the state file of %s: %v", mp, err)
	}
	var s map[string]any
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("state file %s: %v\n%s", stateFile(mp), err, b)
	}
	return s
}

// fuseFile is the FUSE file under the mount, from the state file.
func (m *mounted) fuseFile() string {
	m.t.Helper()
	f, _ := m.state()["file"].(string)
	if f == "" {
		m.t.Fatalf("no FUSE file in the state file of %s", m.mp)
	}
	return f
}

// stateFile is where `atrest mount` records a mount point (systemd-escape --path).
func stateFile(mp string) string {
	out, err := exec.Command("systemd-escape", "--path", mp).Output()
	name := strings.TrimSpace(string(out))
	if err != nil || name == "" {
		panic(fmt.Sprintf("systemd-escape --path %s: %v", mp, err))
	}
	return filepath.Join("/run/atrest/mounts", name+".json")
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// isMountpoint reports whether /proc/self/mountinfo lists path as a mount point.
func isMountpoint(t testing.TB, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && mountinfo.Unescape(f[4]) == path {
			return true
		}
	}
	return false
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space, \134 for a

// loopsOver lists the loop devices whose backing file is file, from
// /sys/block/loop*/loop/backing_file.
func loopsOver(t testing.TB, file string) []string {
	t.Helper()
	dirs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // detached since the listing
		}
		if strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)") == file {
			out = append(out, strings.Split(p, "/")[3])
		}
	}
	return out
}

// The tree the round trips write: contents derived from a seed, every 4 KiB block
// stamped with a marker that a scan of the drive looks for.

const plainMarker = "ATREST-MOUNT-PLAINTEXT-"

var mountTreeSizes = []int{0, 1, 4095, 4096, 4097, 65536 + 17, 1<<20 + 3, 3 << 20}

func treeContent(seed uint64, n int) []byte {
	b := randomBytes(n, seed)
	for off := 0; off+len(plainMarker)+8 <= n; off += 4096 {
		copy(b[off:], fmt.Sprintf("%s%08d", plainMarker, seed))
	}
	return b
}

// writeTree writes the tree under root (each file fsynced) and returns the checksums.
func writeTree(t *testing.T, root string, seed uint64) map[string][32]byte {
	t.Helper()
	return testutil.WriteTree(t, root, mountTreeSizes, func(i, n int) []byte { return treeContent(seed+uint64(i), n) })
}

// markers counts the plaintext markers in data.
func markers(data []byte) int { return bytes.Count(data, []byte(plainMarker)) }

// syncAll is sync(1): everything written reaches the drives through the whole stack.
func syncAll() { syscall.Sync() }

// syncFS is sync -f: what was written to the file system mounted on mp reaches the
// drive through the whole stack. Unlike sync(1), it does not wait for the other file
// systems of the machine, such as another test's mount whose server is gone.
func syncFS(t *testing.T, mp string) {
	t.Helper()
	fd, err := unix.Open(mp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		t.Fatalf("syncfs %s: %v", mp, err)
	}
}

// kernelLog follows the kernel log (/dev/kmsg) from the moment it is opened: the
// ring buffer of a busy machine is full, so counting lines of dmesg would not do.
type kernelLog struct {
	t *testing.T
	f *os.File
}

func followKernelLog(t *testing.T) *kernelLog {
	t.Helper()
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		testutil.Unavailable(t, "open /dev/kmsg: %v", err)
	}
	if _, err := syscall.Seek(fd, 0, 2); err != nil { // SEEK_END: only what comes next
		syscall.Close(fd)
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "/dev/kmsg")
	t.Cleanup(func() { f.Close() })
	return &kernelLog{t: t, f: f}
}

// errorsOf returns the messages logged since about I/O or file system errors of the
// block device dev (such as loop3), which the test owns meanwhile, and reads them.
func (k *kernelLog) errorsOf(dev string) []string {
	k.t.Helper()
	var out []string
	buf := make([]byte, 8192)
	for {
		n, err := syscall.Read(int(k.f.Fd()), buf) // one record per read
		if err == syscall.EPIPE {
			continue // records were overwritten before we read them
		}
		if err != nil || n <= 0 {
			return out // EAGAIN: no more
		}
		_, msg, _ := strings.Cut(string(buf[:n]), ";")
		msg, _, _ = strings.Cut(msg, "\n")
		mine := strings.Contains(msg, "("+dev+")") || strings.Contains(msg, "dev "+dev+",") || strings.Contains(msg, dev+":")
		// "operation not supported" is a refused fast zeroing, which the block layer
		// redoes by writing zeroes: no error.
		refused := strings.Contains(msg, "operation not supported error")
		if mine && !refused && (strings.Contains(msg, "error") || strings.Contains(msg, "Remounting")) {
			out = append(out, msg)
		}
	}
}
