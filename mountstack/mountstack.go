package mountstack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/proc"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/volmount"
)

// Options describe the stack that Mount sets up.
type Options struct {
	// Mountpoint is where the file system is mounted (created if missing), resolved
	// with AbsMountpoint.
	Mountpoint string
	// Address is the NBD server and the export that holds the volume.
	Address nbd.Address
	// FSType is the file system type; "" means ext4, the only one ever created.
	FSType string
	// MountOptions are mount(8) -o options, such as "noatime".
	MountOptions string
	// IOTimeout bounds how long a request of the volume waits for the NBD server while
	// the client reconnects, before it fails (EIO in the file system): it is the NBD
	// client's ReconnectTimeout (see nbd.ClientOptions). 0 means DefaultIOTimeout;
	// negative means no reconnects at all.
	IOTimeout time.Duration
	// TakeOver asks the NBD server to end the connections of the volume's current
	// writer and make this mount the writer (nbd.ClientOptions.TakeOver): for a writer
	// that is dead or hung elsewhere. A live mount of the volume on this node is refused
	// all the same.
	TakeOver bool
	// FUSEDir is the directory of the FUSE mount that holds the volume's file. ""
	// means fusefs.DefaultRoot/<the mount point escaped as systemd-escape --path
	// does>, which is removed again once unmounted (a directory given here stays).
	FUSEDir string
	// Logger receives a record for each thing an administrator may want to know: what
	// was mounted, warnings, the stop, the NBD client's reconnects (nbd.ClientOptions),
	// the FUSE server's Device errors and diagnostics (fusefs.Options). It is used from
	// several goroutines. Nil discards the records.
	Logger *slog.Logger
}

// DefaultIOTimeout is the default of Options.IOTimeout: longer than the 120 s for which
// atrest serve holds the requests of a volume whose drive is missing, so that the
// server, which knows why, answers first.
const DefaultIOTimeout = 180 * time.Second

// Stack is a stack that Mount set up and that this process serves until Close.
type Stack struct {
	mp      string
	fuseDir string
	name    string // of the FUSE file
	loop    string
	log     *slog.Logger
	client  *nbd.Client
	srv     *fusefs.Server
	state   State      // as recorded in the state file
	lossMu  sync.Mutex // serializes recordLoss (Abandon may run beside Close)
}

// Mount sets the stack up in order: it connects to the NBD export, serves it as a file
// in a FUSE directory, attaches a loop device with direct I/O over that file (set up
// for discards, see below), creates ext4 there if the volume holds no signature at all
// (never over existing data), and mounts it on the mount point. It records the stack,
// with this process as the one that serves it, in the mount point's state file under
// StateDir, and returns once the file system is mounted.
//
// It refuses (errors matching ErrBusy) a mount point with a file system on it, one
// that a live process already serves, one whose crashed server left its FUSE mount
// behind, a FUSE directory already in use, a volume that a live mount of this node
// already has (ErrVolumeMounted: before connecting when it has the same NBD address
// and export; when it has the same volume identity under another export name, after a
// read-only connection that asks for the identity and before this mount connects as a
// writer, let alone takes the volume over), and a volume whose server says that another
// writer holds it (ErrVolumeHeld); a stale state file is removed. On failure it undoes
// what it did. ctx bounds the connection to the server (at most 30 s) and nothing
// after it.
//
// Discards: fstrim on the volume reaches the drive as trims if the export offers trim
// (the NBD client's Caps: atrest serve offers it where the drive allows discards), and
// is refused from its first call otherwise (see prepareDiscards).
func Mount(ctx context.Context, o Options) (*Stack, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mp, err := AbsMountpoint(o.Mountpoint)
	if err != nil {
		return nil, err
	}
	fsType := o.FSType
	if fsType == "" {
		fsType = "ext4"
	}
	addr := o.Address

	// Refuse a mount point in use, and clear a stale record.
	st, err := volmount.Inspect(mp)
	if err != nil {
		return nil, err
	}
	if st.Mounted() {
		return nil, mark(fmt.Errorf("%s already has %s (%s) mounted on it", mp, st.Source, st.FSType), ErrMounted)
	}
	if old, err := ReadState(mp); err == nil {
		if old.Alive() {
			return nil, mark(fmt.Errorf("atrest mount (pid %d) already serves %s", old.PID, mp), ErrServed)
		}
		if fuse, _ := volmount.IsFUSEMount(old.FUSEDir); fuse {
			return nil, mark(fmt.Errorf("a crashed atrest mount of %s left its FUSE mount %s behind", mp, old.FUSEDir), ErrLeftBehind)
		}
		if err := removeState(mp); err != nil {
			return nil, err
		}
	}

	fuseDir := o.FUSEDir
	if fuseDir == "" {
		fuseDir = filepath.Join(fusefs.DefaultRoot, escapePath(mp))
	}
	if fuseDir, err = filepath.Abs(fuseDir); err != nil {
		return nil, err
	}
	if fuse, _ := volmount.IsFUSEMount(fuseDir); fuse {
		return nil, mark(fmt.Errorf("%s is already a FUSE mount of atrest", fuseDir), ErrFUSEDirInUse)
	}

	ioTimeout := o.IOTimeout
	if ioTimeout == 0 {
		ioTimeout = DefaultIOTimeout
	}
	// One mount of a volume per node, checked before this mount writes or takes
	// anything over: the same address and export without connecting, the same volume
	// under another export name by a read-only look at its identity.
	if other := liveMount(mp, func(st *State) bool { return st.NBD == addr.String() }); other != nil {
		return nil, mark(fmt.Errorf("export %q of %s is already mounted on %s (atrest mount, pid %d)", addr.Export, addr, other.Mountpoint, other.PID), ErrVolumeMounted)
	}
	host, _ := os.Hostname()
	desc := fmt.Sprintf("atrest mount %s (pid %d on host %s)", mp, os.Getpid(), host)
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	probe, err := dial(dctx, addr, nbd.ClientOptions{ReadOnly: true, Connections: 1, ReconnectTimeout: -1, Description: desc})
	if err != nil {
		return nil, err
	}
	volumeID := probe.VolumeID()
	probe.Close()
	if err := mountedHere(mp, addr, volumeID); err != nil {
		return nil, err
	}
	client, err := dial(dctx, addr, nbd.ClientOptions{TakeOver: o.TakeOver, Description: desc, ReconnectTimeout: ioTimeout, Logger: log})
	if err != nil {
		return nil, err
	}
	s := &Stack{mp: mp, fuseDir: fuseDir, log: log, client: client}
	if v := client.VolumeID(); v != volumeID {
		// Another server answered meanwhile: check its volume as well.
		volumeID = v
		if err := mountedHere(mp, addr, v); err != nil {
			s.closeClient()
			return nil, err
		}
	}
	info := client.Info()

	s.name = addr.Export
	if fusefs.CheckName(s.name) != nil {
		s.name = "volume"
	}
	// The export offers TRIM only where the drive allows discards (atrest serve); the
	// FUSE file lets holes through exactly then, asking the client's Caps itself.
	discard := client.Caps().Trim
	path := filepath.Join(fuseDir, s.name)
	fopts := fusefs.Options{Logger: log, TrimHoles: func(string) bool { return writeZeroesOff(path) }}
	srv, err := fusefs.Mount(fuseDir, []fusefs.File{{Name: s.name, Device: client}}, fopts)
	if err != nil {
		s.closeClient()
		return nil, err
	}
	s.srv = srv
	file := srv.Path(s.name)
	state := &State{Mountpoint: mp, FUSEDir: fuseDir, File: file, PID: os.Getpid(), NBD: addr.String(), Export: addr.Export, IOTimeout: ioTimeout.String()}
	if !volumeID.IsZero() {
		state.VolumeID = volumeID.String()
	}
	state.StartTime, _, _ = proc.StartTime(os.Getpid())
	if err := writeState(state); err != nil {
		return nil, s.abort(fmt.Errorf("record the mount in %s: %w", StateDir, err))
	}

	label := addr.Export
	if len(label) > 16 {
		label = ""
	}
	prepare := func(loop string) error {
		if !info.ReadOnly {
			prepareDiscards(srv, s.name, loop, discard, log)
		}
		return nil
	}
	vol, err := volmount.Setup(file, mp, volmount.Options{FSType: fsType, MountOptions: o.MountOptions, Label: label, ReadOnly: info.ReadOnly, AfterAttach: prepare})
	if err != nil {
		if errors.Is(err, volmount.ErrUnsupportedFS) {
			err = mark(err, ErrUnsupportedFS)
		}
		return nil, s.abort(err)
	}
	s.loop = vol.Loop
	state.Loop = vol.Loop
	if err := writeState(state); err != nil {
		log.Error("updating the state file failed", "path", StatePath(mp), "err", err)
	}
	s.state = *state
	how := "mounted"
	if vol.Created {
		how = "created " + vol.FSType + " and mounted"
	}
	log.Info(fmt.Sprintf("%s %s on %s", how, file, mp), "export", addr.Export, "server", addr, "size", info.Size, "loop", vol.Loop, "fuse", fuseDir)

	return s, nil
}

// dial connects to the export; its errors match ErrUnknownExport, ErrVolumeHeld or
// ErrUnreachable.
func dial(ctx context.Context, addr nbd.Address, o nbd.ClientOptions) (*nbd.Client, error) {
	c, err := nbd.Dial(ctx, addr.String(), o)
	if err == nil {
		return c, nil
	}
	err = fmt.Errorf("connect to %s: %w", addr, err)
	switch {
	case errors.Is(err, nbd.ErrNoExport):
		return nil, mark(err, ErrUnknownExport)
	case errors.Is(err, nbd.ErrVolumeBusy):
		return nil, mark(err, ErrVolumeHeld)
	}
	return nil, mark(err, ErrUnreachable)
}

// mountedHere refuses (ErrVolumeMounted) a volume that a live mount of this node other
// than mp's has mounted, by its identity (none: nothing to compare).
func mountedHere(mp string, addr nbd.Address, v nbd.VolumeID) error {
	if v.IsZero() {
		return nil
	}
	other := liveMount(mp, func(st *State) bool { return st.VolumeID == v.String() })
	if other == nil {
		return nil
	}
	return mark(fmt.Errorf("volume %s (export %q of %s) is already mounted on %s as export %q (atrest mount, pid %d)",
		v, addr.Export, addr, other.Mountpoint, other.Export, other.PID), ErrVolumeMounted)
}

// abort undoes a Mount that failed once the FUSE directory was mounted, and returns
// err.
func (s *Stack) abort(err error) error {
	if uerr := s.srv.Unmount(); uerr != nil {
		s.log.Error("unmounting the FUSE directory failed", "err", uerr)
	}
	s.srv.Wait()
	removeFUSEDir(s.srv.Dir())
	s.closeClient()
	removeState(s.mp)
	return err
}

// closeClient flushes and closes the NBD client.
func (s *Stack) closeClient() error {
	ferr := s.client.Flush()
	if ferr != nil {
		s.log.Error("flush failed", "err", ferr)
	}
	return errors.Join(ferr, s.client.Close())
}

// Mountpoint is where the file system is mounted (resolved by AbsMountpoint).
func (s *Stack) Mountpoint() string { return s.mp }

// Name is the name of the volume's file in the FUSE directory: the export name, or
// "volume" for one that is no file name.
func (s *Stack) Name() string { return s.name }

// File is the path of the volume's file in the FUSE directory.
func (s *Stack) File() string { return s.srv.Path(s.name) }

// Loop is the loop device, such as /dev/loop3.
func (s *Stack) Loop() string { return s.loop }

// Done is closed when the FUSE mount has ended from outside (umount(8) of the FUSE
// directory, or Unmount of a mount point whose state file was lost): the file system
// above it is gone or dead. Close then cleans up what is left.
func (s *Stack) Done() <-chan struct{} { return s.srv.Done() }

// Close takes the stack down in order: it unmounts the file system (retrying for a
// few seconds while files are open there, then detaching it lazily, so that those
// files stay usable), waits until the loop device is released (it detaches itself once
// the last file is closed), ends the FUSE mount, flushes and closes the NBD client and
// removes the state file. If the FUSE mount has ended from outside (Done), it only
// cleans up after it.
//
// ctx only bounds the wait for files open on a lazily detached file system: once it
// is done, Close gives up with an error matching ErrFilesOpen, leaving the loop device,
// the FUSE mount and the state file for Unmount to remove; the NBD client is closed all
// the same, so that those files fail from then on. Other errors of the teardown match
// ErrBusy where something could not be taken off. A failed flush is joined after the
// teardown's error (which decides what went wrong) and matches ErrFlush; the state
// file then stays, with what the NBD client held unflushed (State.Lost), for Unmount
// to report. Call Close once, from a goroutine that does not serve FUSE.
func (s *Stack) Close(ctx context.Context) error {
	select {
	case <-s.srv.Done():
		// Someone ended the FUSE mount (Unmount without a state file, or by hand):
		// what was above it is gone or dead.
		s.log.Warn(fmt.Sprintf("the FUSE mount %s was ended from outside", s.fuseDir))
		// The state file stays while the flush waits for the server: `atrest umount`
		// may meanwhile have the process Abandon the stack, which records in it what
		// the client held.
		err := mark(s.closeClient(), ErrFlush)
		removeFUSEDir(s.fuseDir)
		if err != nil {
			s.recordLoss() // and keep the state file for Unmount to report it
			return err
		}
		removeState(s.mp)
		return nil
	default:
	}
	s.log.Info("stopping: unmounting " + s.mp)
	err := s.teardown(ctx)
	if cerr := s.closeClient(); cerr != nil {
		err = errors.Join(err, mark(cerr, ErrFlush))
		s.recordLoss() // the state file stays, for Unmount to report it
	}
	if err == nil {
		removeState(s.mp)
		s.log.Info("stopped")
	}
	return err
}

// teardown takes the file system, the loop device and the FUSE mount down, in order
// (see Close).
func (s *Stack) teardown(ctx context.Context) error {
	st, err := volmount.Inspect(s.mp)
	if err != nil {
		return err
	}
	if st.Mounted() && st.Loop == s.loop {
		err := volmount.Unmount(s.mp, false)
		for try := 0; err != nil && errors.Is(err, syscall.EBUSY) && try < 20; try++ {
			time.Sleep(250 * time.Millisecond)
			err = volmount.Unmount(s.mp, false)
		}
		if errors.Is(err, syscall.EBUSY) {
			s.log.Warn(fmt.Sprintf("%v; detaching it lazily: the volume is served until the last file there is closed", err))
			err = volmount.Unmount(s.mp, true)
		}
		if err != nil {
			return mark(err, ErrBusy)
		}
	}
	// Auto-clear detaches the loop device once the file system is gone; Detach waits
	// for it (a few seconds per call), and ends it if something else attached it.
	for {
		err := volmount.Detach(s.loop)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EBUSY) {
			return err
		}
		// The atrest command cancels ctx on a second signal.
		s.log.Info(fmt.Sprintf("waiting for %s to be released (files still open on the detached file system); signal again to stop now", s.loop))
		if ctx.Err() != nil {
			return mark(err, ErrFilesOpen)
		}
	}
	if err := s.srv.Unmount(); err != nil {
		return mark(err, ErrBusy)
	}
	s.srv.Wait()
	removeFUSEDir(s.srv.Dir())
	return nil
}

// Abandon gives the stack up without touching it, for a process about to exit because
// the NBD server is gone: `atrest umount` has Unmount send SIGUSR1 to the mount
// process once it has aborted the FUSE connection and detached the file system, and
// removes the rest once the process has exited. It records in the state file, for
// Unmount to report, how many writes the NBD client holds that the server never
// confirmed durable (nbd.Client.Unflushed), lost with this process, and returns them.
// It waits for nothing (it may be called while Close waits for the server) and
// changes nothing else. The error is that of the state file's update.
func (s *Stack) Abandon() (writes int, bytes int64, err error) {
	return s.recordLoss()
}

// recordLoss records in the state file what the NBD client holds unflushed (State.Lost),
// unless Close has removed the state file.
func (s *Stack) recordLoss() (writes int, bytes int64, err error) {
	s.lossMu.Lock()
	defer s.lossMu.Unlock()
	writes, bytes = s.client.Unflushed()
	st := s.state
	st.Lost, st.LostWrites, st.LostBytes = true, writes, bytes
	if _, err := os.Stat(StatePath(s.mp)); err != nil {
		return writes, bytes, err
	}
	return writes, bytes, writeState(&st)
}

// removeFUSEDir removes a FUSE directory that Mount made under fusefs.DefaultRoot once
// it is unmounted and empty; one given in Options.FUSEDir elsewhere stays.
func removeFUSEDir(dir string) {
	if filepath.Dir(dir) == fusefs.DefaultRoot {
		os.Remove(dir) // fails, harmlessly, if still mounted or not empty
	}
}
