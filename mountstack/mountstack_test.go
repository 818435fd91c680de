package mountstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/proc"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/volmount"
)

// The tests here run the stack in the test process, over an NBD server of the test
// that serves memory; the e2e mount tests run it in `atrest mount` over `atrest serve`.

// requireStack skips (fails in CI) unless loop devices, FUSE and the programs that
// Mount runs are there.
func requireStack(t *testing.T) {
	t.Helper()
	testutil.LoopAndFUSE(t, "blkid", "mount", "mkfs.ext4")
}

// memVolume is the volume identity that serveMem advertises.
var memVolume = nbd.VolumeID{0x6d, 0x65, 0x6d, 15: 1}

// serveMem serves a volume of memory as the export "vol" (with trims) and, as atrest
// serve does for a lone volume, as the default export "", with a volume identity, on a
// unix socket, until the test ends.
func serveMem(t *testing.T, size int64) (nbd.Address, *blockdev.Mem, *nbd.Server) {
	t.Helper()
	mem := blockdev.NewMem(size)
	srv := nbd.NewServer(nbd.ServerConfig{})
	for _, name := range []string{"vol", ""} {
		if err := srv.AddExport(nbd.Export{Name: name, Device: mem, VolumeID: memVolume}); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := nbd.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(context.Background(), l); close(done) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return nbd.Address{Network: "unix", Addr: sock, Export: "vol"}, mem, srv
}

// leftovers takes down whatever a failed test left of the stack on mp (not with
// Unmount: it would signal the test process, which serves the stack).
func leftovers(t *testing.T, mp string) {
	t.Cleanup(func() {
		var file, fuseDir string
		if st, err := ReadState(mp); err == nil {
			file, fuseDir = st.File, st.FUSEDir
		}
		if err := volmount.Teardown(mp); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if file != "" {
			if err := volmount.Teardown(file); err != nil {
				t.Errorf("cleanup: %v", err)
			}
			if err := volmount.UnmountFUSE(fuseDir); err != nil {
				t.Errorf("cleanup: %v", err)
			}
			removeFUSEDir(fuseDir)
		}
		removeState(mp)
	})
}

// nothingLeft fails the test if anything of the stack on mp, with its FUSE file file,
// remains.
func nothingLeft(t *testing.T, mp, file string) {
	t.Helper()
	if st, err := volmount.Inspect(mp); err != nil || st.Mounted() {
		t.Errorf("%s: %+v, %v; want nothing mounted", mp, st, err)
	}
	if loops, err := volmount.LoopsOf(file); err != nil || len(loops) > 0 {
		t.Errorf("loop devices over %s: %v, %v", file, loops, err)
	}
	if fuse, err := volmount.IsFUSEMount(filepath.Dir(file)); err != nil || fuse {
		t.Errorf("the FUSE mount %s is still there (%v)", filepath.Dir(file), err)
	}
	if _, err := os.Lstat(filepath.Dir(file)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the FUSE directory %s made under %s is still there (%v)", filepath.Dir(file), fusefs.DefaultRoot, err)
	}
	if _, err := os.Lstat(StatePath(mp)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file %s: %v, want it removed", StatePath(mp), err)
	}
}

// TestMountClose: Mount creates ext4 on an empty volume, records the stack and
// refuses a second mount on it; Close takes everything down; the next Mount finds the
// file system with the files written; a FUSE mount ended from outside is cleaned up
// after.
func TestMountClose(t *testing.T) {
	requireStack(t)
	addr, _, _ := serveMem(t, 64<<20)
	mp := filepath.Join(t.TempDir(), "mnt")
	var log testutil.Log
	opts := Options{Mountpoint: mp, Address: addr, MountOptions: "noatime", Logger: log.Logger()}
	leftovers(t, mp)

	// A stale state file (its process is gone) is replaced.
	if err := writeState(&State{Mountpoint: mp, FUSEDir: t.TempDir(), File: "/nonexistent", PID: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	s, err := Mount(context.Background(), opts)
	if err != nil {
		t.Fatalf("Mount: %v\n%s", err, log.String())
	}
	if !strings.Contains(log.String(), "created ext4 and mounted") {
		t.Errorf("the first mount did not say it created ext4:\n%s", log.String())
	}
	file := s.File()
	if s.Mountpoint() != mp || s.Name() != "vol" || file != filepath.Join(fusefs.DefaultRoot, escapePath(mp), "vol") || !strings.HasPrefix(s.Loop(), "/dev/loop") {
		t.Errorf("stack: mount point %q, name %q, file %q, loop %q", s.Mountpoint(), s.Name(), file, s.Loop())
	}
	st, err := ReadState(mp)
	if err != nil {
		t.Fatal(err)
	}
	want := State{Mountpoint: mp, FUSEDir: filepath.Dir(file), File: file, Loop: s.Loop(), PID: os.Getpid(), StartTime: st.StartTime,
		NBD: addr.String(), Export: "vol", IOTimeout: "3m0s", VolumeID: memVolume.String()}
	if *st != want || !st.Alive() {
		t.Errorf("state %+v (alive %v), want %+v", *st, st.Alive(), want)
	}
	if vs, err := volmount.Inspect(mp); err != nil || vs.File != file || vs.FSType != "ext4" || vs.Loop != s.Loop() {
		t.Errorf("Inspect(%s) = %+v, %v", mp, vs, err)
	}

	// Refusals that change nothing.
	if _, err := Mount(context.Background(), opts); !errors.Is(err, ErrMounted) || !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "already has") {
		t.Errorf("a second Mount on %s: %v, want ErrMounted", mp, err)
	}
	other := filepath.Join(t.TempDir(), "other")
	leftovers(t, other)
	if _, err := Mount(context.Background(), Options{Mountpoint: other, Address: addr, FUSEDir: filepath.Dir(file)}); !errors.Is(err, ErrFUSEDirInUse) {
		t.Errorf("Mount with the FUSE directory of another: %v, want ErrFUSEDirInUse", err)
	}

	// What is written through the stack outlives it.
	data := bytes.Repeat([]byte("mountstack"), 100_000)
	if err := os.WriteFile(filepath.Join(mp, "f"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
		t.Fatal("Done before Close")
	default:
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v\n%s", err, log.String())
	}
	if !strings.Contains(log.String(), "stopping: unmounting "+mp) || !strings.HasSuffix(log.String(), "stopped\n") {
		t.Errorf("Close did not say it stopped:\n%s", log.String())
	}
	nothingLeft(t, mp, file)

	log = testutil.Log{}
	s, err = Mount(context.Background(), opts)
	if err != nil {
		t.Fatalf("Mount again: %v\n%s", err, log.String())
	}
	if strings.Contains(log.String(), "created") {
		t.Errorf("the second mount created a file system:\n%s", log.String())
	}
	if got, err := os.ReadFile(filepath.Join(mp, "f")); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the file written before Close: %d bytes, %v; want %d bytes as written", len(got), err, len(data))
	}
	// As `atrest umount` does when the state file is lost.
	if err := volmount.Teardown(mp); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("Done not closed 30 s after the FUSE mount was ended")
	}
	if err := s.Close(context.Background()); err != nil {
		t.Errorf("Close after the FUSE mount was ended from outside: %v", err)
	}
	if !strings.Contains(log.String(), "was ended from outside") {
		t.Errorf("Close did not say the FUSE mount was ended from outside:\n%s", log.String())
	}
	nothingLeft(t, mp, file)
}

// TestMountRefusals: what Mount refuses before it mounts anything, with the sentinel
// that the atrest command maps to an exit code, leaving nothing behind.
func TestMountRefusals(t *testing.T) {
	testutil.Root(t) // the state files are root's
	addr, _, _ := serveMem(t, 1<<20)
	mp := filepath.Join(t.TempDir(), "mnt")
	fuseDir := filepath.Join(t.TempDir(), "fuse")
	mount := func(addr nbd.Address) error {
		_, err := Mount(context.Background(), Options{Mountpoint: mp, Address: addr, FUSEDir: fuseDir})
		if err == nil {
			t.Fatal("Mount succeeded")
		}
		if fuse, _ := volmount.IsFUSEMount(fuseDir); fuse {
			t.Errorf("a refused Mount left the FUSE mount %s", fuseDir)
			volmount.UnmountFUSE(fuseDir)
		}
		return err
	}

	unknown := addr
	unknown.Export = "nope"
	if err := mount(unknown); !errors.Is(err, ErrUnknownExport) || !strings.Contains(err.Error(), "connect to "+unknown.String()) {
		t.Errorf("an unknown export: %v, want ErrUnknownExport", err)
	}
	gone := nbd.Address{Network: "unix", Addr: filepath.Join(t.TempDir(), "nobody.sock")}
	if err := mount(gone); !errors.Is(err, ErrUnreachable) || errors.Is(err, ErrUnknownExport) {
		t.Errorf("no server: %v, want ErrUnreachable", err)
	}

	// A live process (this one) serves mp, by its state file.
	t.Cleanup(func() { removeState(mp) })
	self := &State{Mountpoint: mp, FUSEDir: fuseDir, PID: os.Getpid()}
	self.StartTime, _, _ = proc.StartTime(os.Getpid())
	if err := writeState(self); err != nil {
		t.Fatal(err)
	}
	if err := mount(addr); !errors.Is(err, ErrServed) || !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), fmt.Sprintf("(pid %d) already serves %s", os.Getpid(), mp)) {
		t.Errorf("a mount point served by a live process: %v, want ErrServed", err)
	}
	if _, err := ReadState(mp); err != nil {
		t.Errorf("the state file of the live process: %v, want it kept", err)
	}

	// A crashed mount (a start time that is not this process's) left its FUSE mount.
	left, err := fusefs.Mount(filepath.Join(t.TempDir(), "left"), []fusefs.File{{Name: "volume", Device: blockdev.NewMem(1 << 20)}}, fusefs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { left.Unmount(); left.Wait() })
	crashed := &State{Mountpoint: mp, FUSEDir: left.Dir(), PID: os.Getpid(), StartTime: self.StartTime + 1}
	if err := writeState(crashed); err != nil {
		t.Fatal(err)
	}
	if err := mount(addr); !errors.Is(err, ErrLeftBehind) || !errors.Is(err, ErrBusy) {
		t.Errorf("a mount point whose crashed mount left its FUSE mount: %v, want ErrLeftBehind", err)
	}

	// A state file that cannot be read: Unmount refuses with ErrState and keeps it.
	if err := os.WriteFile(StatePath(mp), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Unmount(context.Background(), mp, time.Second); !errors.Is(err, ErrState) {
		t.Errorf("Unmount with an unreadable state file: %v, want ErrState", err)
	}
	if b, _ := os.ReadFile(StatePath(mp)); string(b) != "{not json" {
		t.Error("Unmount changed the unreadable state file")
	}
}

// TestMountOneWriter: a volume that a live mount of this node has is refused, with
// ErrVolumeMounted naming that mount: under the same address and export before
// connecting, under another export name before this mount connects as a writer (so
// --take-over takes nothing from it); a volume that a writer elsewhere holds is refused
// with ErrVolumeHeld naming that writer, and taken over with TakeOver.
func TestMountOneWriter(t *testing.T) {
	requireStack(t)
	addr, _, srv := serveMem(t, 64<<20)
	mp1, mp2 := filepath.Join(t.TempDir(), "one"), filepath.Join(t.TempDir(), "two")
	leftovers(t, mp1)
	leftovers(t, mp2)
	var log testutil.Log
	s, err := Mount(context.Background(), Options{Mountpoint: mp1, Address: addr, Logger: log.Logger()})
	if err != nil {
		t.Fatalf("Mount: %v\n%s", err, log.String())
	}

	accepted := srv.Stats().Accepted
	_, err = Mount(context.Background(), Options{Mountpoint: mp2, Address: addr, TakeOver: true})
	if !errors.Is(err, ErrVolumeMounted) || !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "already mounted on "+mp1) {
		t.Errorf("a second mount of the same export: %v, want ErrVolumeMounted naming %s", err, mp1)
	}
	if n := srv.Stats().Accepted; n != accepted {
		t.Errorf("the refusal of the same export connected to the server (%d connections)", n-accepted)
	}
	def := addr
	def.Export = ""
	_, err = Mount(context.Background(), Options{Mountpoint: mp2, Address: def, TakeOver: true})
	if !errors.Is(err, ErrVolumeMounted) || !strings.Contains(err.Error(), memVolume.String()) || !strings.Contains(err.Error(), mp1+` as export "vol"`) {
		t.Errorf("a second mount of the volume as the default export: %v, want ErrVolumeMounted naming %s", err, mp1)
	}
	if _, err := os.Lstat(StatePath(mp2)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused mount left its state file (%v)", err)
	}
	// The first mount still writes: nothing took it over.
	if err := os.WriteFile(filepath.Join(mp1, "f"), []byte("still mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v\n%s", err, log.String())
	}

	// A writer elsewhere holds the volume.
	w, err := nbd.Dial(context.Background(), def.String(), nbd.ClientOptions{Description: "writer elsewhere", ReconnectTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	_, err = Mount(context.Background(), Options{Mountpoint: mp2, Address: addr})
	if !errors.Is(err, ErrVolumeHeld) || !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "writer elsewhere") {
		t.Errorf("a mount of a volume held elsewhere: %v, want ErrVolumeHeld naming the writer", err)
	}
	s, err = Mount(context.Background(), Options{Mountpoint: mp2, Address: addr, TakeOver: true, Logger: log.Logger()})
	if err != nil {
		t.Fatalf("Mount with TakeOver: %v\n%s", err, log.String())
	}
	if _, err := w.WriteAt([]byte("late"), 0); !errors.Is(err, nbd.ErrTakenOver) {
		t.Errorf("the writer taken over writes: %v, want ErrTakenOver", err)
	}
	if got, err := os.ReadFile(filepath.Join(mp2, "f")); err != nil || string(got) != "still mine" {
		t.Errorf("the file written by the first mount: %q, %v", got, err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v\n%s", err, log.String())
	}
}

// TestUnmountNothing: Unmount of a mount point without a state file and with nothing
// mounted, or of a path that does not exist, fails with ErrNotMounted, saying which
// (`atrest umount` exits non-zero); a state file whose process is gone and nothing
// else is stale: Unmount removes it and says so.
func TestUnmountNothing(t *testing.T) {
	testutil.Root(t) // the state files are root's
	mp := t.TempDir()
	if _, err := Unmount(context.Background(), mp, time.Second); !errors.Is(err, ErrNotMounted) || !strings.Contains(err.Error(), "nothing is mounted on "+mp) {
		t.Errorf("Unmount of an empty directory: %v, want ErrNotMounted", err)
	}
	missing := filepath.Join(mp, "missing")
	if _, err := Unmount(context.Background(), missing, time.Second); !errors.Is(err, ErrNotMounted) || !strings.Contains(err.Error(), missing+" does not exist") {
		t.Errorf("Unmount of a missing directory: %v, want ErrNotMounted", err)
	}

	t.Cleanup(func() { removeState(mp) })
	stale := &State{Mountpoint: mp, FUSEDir: filepath.Join(t.TempDir(), "fuse"), File: "/nonexistent/volume", PID: 1 << 30, NBD: "unix:/nonexistent"}
	if err := writeState(stale); err != nil {
		t.Fatal(err)
	}
	res, err := Unmount(context.Background(), mp, time.Second)
	if err != nil || res.Outcome != StaleState || res.PID != 1<<30 || res.Mountpoint != mp {
		t.Errorf("Unmount with a stale state file: %+v, %v; want StaleState", res, err)
	}
	if _, err := os.Lstat(StatePath(mp)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stale state file: %v, want it removed", err)
	}
}

// TestCloseGivesUp: Close with files open on the volume detaches the file system
// lazily, waits for the loop device to be released, and gives up with ErrFilesOpen
// once its context is done (the atrest command cancels it on a second signal),
// leaving the FUSE mount and the state file. Read-only, so that nothing is written
// once the NBD client is closed.
func TestCloseGivesUp(t *testing.T) {
	requireStack(t)
	addr, _, _ := serveMem(t, 64<<20)
	mp := filepath.Join(t.TempDir(), "mnt")
	leftovers(t, mp)
	var log testutil.Log
	s, err := Mount(context.Background(), Options{Mountpoint: mp, Address: addr, Logger: log.Logger()})
	if err != nil {
		t.Fatalf("Mount: %v\n%s", err, log.String())
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	s, err = Mount(context.Background(), Options{Mountpoint: mp, Address: addr, MountOptions: "ro", Logger: log.Logger()})
	if err != nil {
		t.Fatalf("Mount read-only: %v\n%s", err, log.String())
	}
	file := s.File()
	dir, err := os.Open(mp)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()

	ctx, cancel := context.WithCancel(context.Background())
	closed := make(chan error, 1)
	go func() { closed <- s.Close(ctx) }()
	for deadline := time.Now().Add(60 * time.Second); !strings.Contains(log.String(), "waiting for "+s.Loop()+" to be released"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("Close with a directory open did not wait for the loop device:\n%s", log.String())
		}
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned %v before its context was done", err)
	default:
	}
	cancel()
	select {
	case err = <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not give up 30 s after its context was done")
	}
	if !errors.Is(err, ErrFilesOpen) || !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), s.Loop()) {
		t.Errorf("Close with a directory open: %v, want ErrFilesOpen naming %s", err, s.Loop())
	}
	if !strings.Contains(log.String(), "detaching it lazily") {
		t.Errorf("no lazy detach:\n%s", log.String())
	}
	if vs, _ := volmount.Inspect(mp); vs.Mounted() {
		t.Errorf("%s is still mounted after the lazy detach", mp)
	}
	if fuse, _ := volmount.IsFUSEMount(filepath.Dir(file)); !fuse {
		t.Error("the FUSE mount under the open directory was ended")
	}
	if _, err := ReadState(mp); err != nil {
		t.Errorf("state file after Close gave up: %v, want it kept for Unmount", err)
	}
	dir.Close()
	// The loop device lets go once the file system is released, and the rest is what
	// Unmount removes after a crash.
	if err := volmount.Teardown(file); err != nil {
		t.Fatal(err)
	}
	<-s.Done()
	removeFUSEDir(filepath.Dir(file))
	removeState(mp)
	nothingLeft(t, mp, file)
}

// TestAbandonRecordsLoss: Abandon records in the state file what the NBD client holds
// that the server has not made durable (with ext4 mounted nobarrier nothing is ever
// flushed, so all that fsync wrote is still held), for Unmount to report, and touches
// nothing else: the stack still works and Close takes it down as usual.
func TestAbandonRecordsLoss(t *testing.T) {
	requireStack(t)
	addr, _, _ := serveMem(t, 64<<20)
	mp := filepath.Join(t.TempDir(), "mnt")
	leftovers(t, mp)
	var log testutil.Log
	s, err := Mount(context.Background(), Options{Mountpoint: mp, Address: addr, MountOptions: "barrier=0", IOTimeout: 7 * time.Second, Logger: log.Logger()})
	if err != nil {
		t.Fatalf("Mount: %v\n%s", err, log.String())
	}
	if st, err := ReadState(mp); err != nil || st.IOTimeout != "7s" || st.Lost {
		t.Errorf("state %+v, %v; want io_timeout 7s and no loss", st, err)
	}
	data := bytes.Repeat([]byte("abandon!"), 1<<17) // 1 MiB
	f, err := os.Create(filepath.Join(mp, "f"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()

	writes, n, err := s.Abandon()
	if err != nil || writes == 0 || n < int64(len(data)) {
		t.Errorf("Abandon: %d writes, %d bytes, %v; want at least the %d bytes fsynced", writes, n, err, len(data))
	}
	st, err := ReadState(mp)
	if err != nil || !st.Lost || st.LostWrites != writes || st.LostBytes != n || st.Loop != s.Loop() {
		t.Errorf("state after Abandon: %+v, %v; want the loss recorded (%d, %d)", st, err, writes, n)
	}
	if loss := recordedLoss(mp); loss == nil || *loss != (Loss{Writes: writes, Bytes: n}) {
		t.Errorf("recordedLoss: %+v", loss)
	}
	if got, err := os.ReadFile(filepath.Join(mp, "f")); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the file after Abandon: %d bytes, %v", len(got), err)
	}
	file := s.File()
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v\n%s", err, log.String())
	}
	nothingLeft(t, mp, file)
}

// TestServerGone: what Unmount takes for a server that is gone, from nbd.Probe's error:
// nothing listening, and a listener that never greets (a hung server), are gone; one
// that accepts and closes at once (at its connection limit) is there.
func TestServerGone(t *testing.T) {
	dir := t.TempDir()
	probe := func(sock string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		return nbd.Probe(ctx, "unix:"+sock)
	}
	listen := func(name string, accept func(net.Conn)) string {
		sock := filepath.Join(dir, name)
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				accept(c)
			}
		}()
		return sock
	}
	var (
		mu   sync.Mutex
		hung []net.Conn
	)
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range hung {
			c.Close()
		}
	})
	for _, c := range []struct {
		name string
		sock string
		gone bool
	}{
		{"nothing listens", filepath.Join(dir, "nobody.sock"), true},
		{"never greets", listen("hung.sock", func(c net.Conn) { mu.Lock(); hung = append(hung, c); mu.Unlock() }), true},
		{"accepts and closes", listen("full.sock", func(c net.Conn) { c.Close() }), false},
	} {
		err := probe(c.sock)
		if err == nil || serverGone(err) != c.gone {
			t.Errorf("%s: probe %v, gone %v; want gone %v", c.name, err, serverGone(err), c.gone)
		}
	}
}
