package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"log/syslog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/volmount"
)

// mountStateDir holds one JSON file per mount that `atrest mount` set up (mountState),
// so that `atrest umount` finds every piece, also after a crash.
const mountStateDir = "/run/atrest/mounts"

// readyFDEnv names the descriptor on which a background child reports readiness (or
// its error) to the parent that started it.
const readyFDEnv = "ATREST_MOUNT_READY_FD"

type mountOptions struct {
	nbd        string // NBD address or URI; "" is the local daemon's socket
	export     string // overrides the URI's export
	fsType     string
	options    string // mount(8) -o options
	fuseDir    string // "" is fusefs.DefaultRoot/<escaped mount point>
	mountpoint string
	background bool
	log        io.Writer
}

func init() {
	register(&cli.Command{
		Name:      "mount",
		Usage:     "mount a volume: NBD export → FUSE file → loop device → ext4",
		ArgsUsage: "MOUNTPOINT",
		Description: "Connects to an NBD export (by default the local daemon's socket " + defaultSocket + "),\n" +
			"exposes it as a file in a FUSE directory (" + fusefs.DefaultRoot + "/<mount point> unless --fuse-dir),\n" +
			"attaches a loop device with direct I/O over it, creates ext4 if the volume holds no\n" +
			"signature at all (never over existing data), mounts it on MOUNTPOINT and serves the\n" +
			"FUSE file in the foreground. Tells systemd READY=1 once the file system is mounted.\n" +
			"On SIGTERM or SIGINT: unmounts, detaches the loop device, ends the FUSE mount, flushes.\n" +
			"With --background it returns once the volume is mounted and serves in a child process.\n" +
			"'atrest umount MOUNTPOINT' undoes it all, also after a crash.\n\n" +
			"A volume that reads as noise holds no signature: a freshly formatted drive's data area is\n" +
			"noise (unless formatted with --wipe), so the first mount creates the file system.\n\n" +
			"fstrim on the volume reaches the drive as trims if the drive was formatted with\n" +
			"--allow-discards, and is refused (\"not supported\") otherwise.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "nbd", Usage: "NBD server: nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT, unix:PATH or tcp:HOST:PORT (default: unix:" + defaultSocket + ")"},
			&cli.StringFlag{Name: "export", Usage: "export (volume) name; overrides the one in --nbd (default: the server's default export)"},
			&cli.StringFlag{Name: "fs", Value: "ext4", Usage: "file system type; only ext4 is ever created"},
			&cli.StringFlag{Name: "options", Aliases: []string{"o"}, Usage: "mount options, as for mount -o (e.g. noatime)"},
			&cli.BoolFlag{Name: "background", Usage: "return once mounted; a child process serves the volume"},
			&cli.StringFlag{Name: "fuse-dir", Usage: "directory for the FUSE mount (default: " + fusefs.DefaultRoot + "/<escaped mount point>)"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return usagef("mount takes one MOUNTPOINT")
			}
			o := mountOptions{
				nbd: c.String("nbd"), export: c.String("export"), fsType: c.String("fs"),
				options: c.String("options"), fuseDir: c.String("fuse-dir"), mountpoint: c.Args().First(),
				background: c.Bool("background"), log: c.App.ErrWriter,
			}
			if fd := os.Getenv(readyFDEnv); fd != "" {
				return runMountChild(c.Context, o, fd)
			}
			if o.background {
				return runMountBackground(o)
			}
			return runMount(c.Context, o, nil)
		},
	})
}

// mountState is what `atrest mount` records in mountStateDir for `atrest umount`.
type mountState struct {
	Mountpoint string `json:"mountpoint"`
	FUSEDir    string `json:"fuse_dir"`
	File       string `json:"file"`           // the FUSE file the loop device is attached to
	Loop       string `json:"loop,omitempty"` // set once attached
	PID        int    `json:"pid"`
	StartTime  uint64 `json:"start_time"` // of PID, in clock ticks since boot (proc(5) stat field 22)
	NBD        string `json:"nbd"`
	Export     string `json:"export"`
}

// statePath is the state file of a mount point: its path escaped as systemd-escape
// --path does (so /srv/vol1 is srv-vol1.json, like the unit atrest-mount@srv-vol1).
func statePath(mountpoint string) string {
	return filepath.Join(mountStateDir, escapePath(mountpoint)+".json")
}

// escapePath escapes an absolute path into one file name, as systemd-escape --path
// does: slashes become '-', other bytes outside [A-Za-z0-9:_.] (and a leading '.')
// become \xNN. A result too long for a file name is replaced by a hash.
func escapePath(p string) string {
	p = strings.Trim(filepath.Clean(p), "/")
	if p == "" {
		return "-"
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '/':
			b.WriteByte('-')
		case c == '.' && i == 0:
			fmt.Fprintf(&b, `\x%02x`, c)
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == ':', c == '_', c == '.':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, `\x%02x`, c)
		}
	}
	if b.Len() > 200 {
		sum := sha256.Sum256([]byte(p))
		return "sha256-" + hex.EncodeToString(sum[:16])
	}
	return b.String()
}

func readState(mountpoint string) (*mountState, error) {
	data, err := os.ReadFile(statePath(mountpoint))
	if err != nil {
		return nil, err
	}
	var s mountState
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("state file %s: %w", statePath(mountpoint), err)
	}
	return &s, nil
}

// writeState replaces the state file atomically.
func writeState(s *mountState) error {
	if err := os.MkdirAll(mountStateDir, 0o700); err != nil {
		return err
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	p := statePath(s.Mountpoint)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

func removeState(mountpoint string) error {
	err := os.Remove(statePath(mountpoint))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// procStartTime returns the start time of process pid (proc(5) stat field 22), which
// tells a process apart from a later one that reuses its pid, and whether it has
// exited (a zombie, not yet reaped by its parent: the pid is still taken).
func procStartTime(pid int) (start uint64, exited bool, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false, err
	}
	// The command name (field 2) may hold spaces and parentheses: fields start after
	// the last ')', with the state (field 3).
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, false, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, false, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	start, err = strconv.ParseUint(f[19], 10, 64) // field 22 is the 20th after the name
	return start, f[0] == "Z" || f[0] == "X", err
}

// alive reports whether the process that wrote s still runs.
func (s *mountState) alive() bool {
	st, exited, err := procStartTime(s.PID)
	return err == nil && !exited && st == s.StartTime
}

// defaultNBD is the local daemon's socket.
const defaultNBD = "unix:" + defaultSocket

// switchWriter is the log destination; a background child switches it to syslog (or
// to nothing) once its parent has returned.
type switchWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *switchWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.w.Write(p)
	return len(p), nil
}

func (s *switchWriter) set(w io.Writer) {
	s.mu.Lock()
	s.w = w
	s.mu.Unlock()
}

// readiness is how a foreground mount says it is mounted: sd_notify, and for a
// background child also the pipe to its parent.
type readiness struct {
	pipe *os.File // nil in the foreground
	sent bool
}

// runMount sets the stack up, serves it until SIGTERM/SIGINT (ctx) or until the FUSE
// mount is ended from outside, then takes it down in order. ready is nil in the
// foreground.
func runMount(ctx context.Context, o mountOptions, ready *readiness) (err error) {
	out := &switchWriter{w: o.log}
	logf := func(format string, args ...any) { fmt.Fprintf(out, "atrest mount: "+format+"\n", args...) }

	mp, err := filepath.Abs(o.mountpoint)
	if err != nil {
		return usageError(err)
	}
	if r, err := filepath.EvalSymlinks(mp); err == nil {
		mp = r
	}
	if o.fsType == "" {
		o.fsType = "ext4"
	}
	addrText := o.nbd
	if addrText == "" {
		addrText = defaultNBD
	}
	addr, err := nbd.ParseAddress(addrText)
	if err != nil {
		return usagef("--nbd: %v", err)
	}
	if o.export != "" {
		addr.Export = o.export
	}

	// The process that serves the FUSE file must be an I/O flusher (see fusefs); this
	// re-executes the process on success, so it comes before anything that must not
	// happen twice.
	if err := fusefs.EnsureIOFlusher(); err != nil {
		logf("warning: not running as an I/O flusher (%v): under memory pressure the mount can deadlock; run as root with CAP_SYS_RESOURCE", err)
	}
	if ready != nil && ready.pipe != nil {
		// Kept across EnsureIOFlusher's re-execution, dropped from here on: not for
		// mkfs, mount and the like.
		os.Unsetenv(readyFDEnv)
		unix.CloseOnExec(int(ready.pipe.Fd()))
	}

	// Signals are counted here as well as cancelling ctx: a second one cuts short a
	// teardown that waits for open files. (Counted rather than received: the first
	// signal reaches ctx and this channel in no fixed order.)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	var signals atomic.Int32
	go func() {
		for range sigs {
			signals.Add(1)
		}
	}()

	// Refuse a mount point in use, and clear a stale record.
	st, err := volmount.Inspect(mp)
	if err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	if st.Mounted() {
		return fail(exitcodes.Busy, fmt.Errorf("%s already has %s (%s) mounted on it", mp, st.Source, st.FSType),
			"unmount it first ('atrest umount "+mp+"' for an atrest volume)")
	}
	if old, err := readState(mp); err == nil {
		if old.alive() {
			return fail(exitcodes.Busy, fmt.Errorf("atrest mount (pid %d) already serves %s", old.PID, mp), "'atrest umount "+mp+"' stops it")
		}
		if fuse, _ := volmount.IsFUSEMount(old.FUSEDir); fuse {
			return fail(exitcodes.Busy, fmt.Errorf("a crashed atrest mount of %s left its FUSE mount %s behind", mp, old.FUSEDir),
				"'atrest umount "+mp+"' cleans up after it")
		}
		if err := removeState(mp); err != nil {
			return fail(exitcodes.Failure, err, "")
		}
	}

	fuseDir := o.fuseDir
	if fuseDir == "" {
		fuseDir = filepath.Join(fusefs.DefaultRoot, escapePath(mp))
	}
	if fuseDir, err = filepath.Abs(fuseDir); err != nil {
		return usageError(err)
	}
	if fuse, _ := volmount.IsFUSEMount(fuseDir); fuse {
		return fail(exitcodes.Busy, fmt.Errorf("%s is already a FUSE mount of atrest", fuseDir),
			"another 'atrest mount' uses it, or a crashed one left it: 'atrest umount' its mount point, or choose another --fuse-dir")
	}

	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	client, err := nbd.Dial(dctx, addr.String(), nbd.ClientOptions{Logf: func(f string, a ...any) { logf("nbd: "+f, a...) }})
	cancel()
	if err != nil {
		if strings.Contains(err.Error(), "no export named") {
			return fail(exitcodes.DriveMissing, fmt.Errorf("connect to %s: %w", addr, err), "'atrest drive list' shows the volumes; 'atrest serve' must serve the drive")
		}
		return fail(exitcodes.IO, fmt.Errorf("connect to %s: %w", addr, err), "is the daemon running ('systemctl status atrest', or 'atrest serve')?")
	}
	closeClient := func() error {
		ferr := client.Flush()
		if ferr != nil {
			logf("flush: %v", ferr)
		}
		return errors.Join(ferr, client.Close())
	}
	info := client.Info()

	name := addr.Export
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 255 {
		name = "volume"
	}
	logger := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// The export offers TRIM only where the drive allows discards (atrest serve).
	discard := info.CanTrim && !info.ReadOnly
	fopts := fusefs.Options{Logger: logger, Discard: discard}
	if discard {
		path := filepath.Join(fuseDir, name)
		fopts.TrimHoles = func(string) bool { return writeZeroesOff(path) }
	}
	srv, err := fusefs.Mount(fuseDir, []fusefs.File{{Name: name, Device: client}}, fopts)
	if err != nil {
		closeClient()
		return fail(exitcodes.Failure, err, "")
	}
	file := srv.Path(name)
	state := &mountState{Mountpoint: mp, FUSEDir: fuseDir, File: file, PID: os.Getpid(), NBD: addr.String(), Export: addr.Export}
	state.StartTime, _, _ = procStartTime(os.Getpid())
	abort := func(e error) error {
		if uerr := srv.Unmount(); uerr != nil {
			logf("%v", uerr)
		}
		srv.Wait()
		removeFUSEDir(srv.Dir())
		closeClient()
		removeState(mp)
		return e
	}
	if err := writeState(state); err != nil {
		return abort(fail(exitcodes.Failure, fmt.Errorf("record the mount in %s: %w", mountStateDir, err), ""))
	}

	label := addr.Export
	if len(label) > 16 {
		label = ""
	}
	prepare := func(loop string) error {
		if !info.ReadOnly {
			prepareDiscards(srv, name, loop, discard, logf)
		}
		return nil
	}
	vol, err := volmount.Setup(file, mp, volmount.Options{FSType: o.fsType, MountOptions: o.options, Label: label, ReadOnly: info.ReadOnly, AfterAttach: prepare})
	if err != nil {
		switch {
		case errors.Is(err, volmount.ErrNotEmpty):
			err = fail(exitcodes.Exists, err, "the volume holds something else; atrest never formats over it")
		case strings.Contains(err.Error(), "only ext4"):
			err = usageError(err)
		default:
			err = fail(exitcodes.Failure, err, "")
		}
		return abort(err)
	}
	state.Loop = vol.Loop
	if err := writeState(state); err != nil {
		logf("update %s: %v", statePath(mp), err)
	}
	how := "mounted"
	if vol.Created {
		how = "created " + vol.FSType + " and mounted"
	}
	logf("%s %s (export %q of %s, %d bytes) on %s through %s and %s", how, file, addr.Export, addr, info.Size, mp, vol.Loop, fuseDir)

	if _, err := nbd.Notify(fmt.Sprintf("READY=1\nSTATUS=%s mounted on %s", name, mp)); err != nil {
		logf("sd_notify: %v", err)
	}
	if ready != nil {
		ready.signal(out)
	}

	fuseDone := make(chan struct{})
	go func() { srv.Wait(); close(fuseDone) }()
	select {
	case <-ctx.Done():
	case <-fuseDone:
		// Someone ended the FUSE mount (atrest umount without a state file, or by
		// hand): what was above it is gone or dead.
		logf("the FUSE mount %s was ended from outside", fuseDir)
		removeFUSEDir(fuseDir)
		removeState(mp)
		if err := closeClient(); err != nil {
			return fail(exitcodes.IO, err, "")
		}
		return nil
	}
	nbd.Notify("STOPPING=1")
	logf("stopping: unmounting %s", mp)
	err = teardownMount(mp, vol.Loop, srv, func() bool { return signals.Load() >= 2 }, logf)
	if cerr := closeClient(); cerr != nil {
		err = errors.Join(err, fail(exitcodes.IO, cerr, ""))
	}
	if err == nil {
		removeState(mp)
		logf("stopped")
	}
	return err
}

// prepareDiscards sets the loop device up, before anything uses it, so that fstrim on
// the volume either reaches the drive as trims or is refused from the first call.
//
// A loop device sends both a discard and a WRITE_ZEROES that may unmap to its file as
// fallocate PUNCH_HOLE, and a punched hole must read back as zeroes, which a trimmed
// range of an encrypted drive does not (it decrypts to noise). So a punched hole may be
// passed on as a trim only while the loop device has write-zeroes off: then the block
// layer zeroes by writing zero pages, and every punched hole is a discard. Linux 6.18's
// loop driver turns write-zeroes off for good (and keeps discards) when its file
// answers ZERO_RANGE with EOPNOTSUPP: RefuseZeroRange makes the FUSE file do that for a
// BLKZEROOUT of the first block, without changing a byte; the queue limit says whether
// it worked (if not, punched holes stay zeroings, which the encrypted drive refuses, and
// fstrim is refused).
//
// Without discards, a BLKDISCARD that the FUSE file refuses turns the loop device's
// discards off at once, so that the first fstrim is already refused ("the discard
// operation is not supported"), instead of failing inside ext4, which would report
// the range trimmed.
func prepareDiscards(srv *fusefs.Server, name, loop string, discard bool, logf func(string, ...any)) {
	if !discard {
		err := volmount.Discard(loop, 0, 4096)
		if n, lerr := volmount.QueueLimit(loop, "discard_max_bytes"); lerr != nil || n != 0 {
			logf("warning: discards are not allowed on this drive, but %s still accepts them (%v, %v): the first fstrim may report bytes it did not trim", loop, err, lerr)
		}
		return
	}
	err := srv.RefuseZeroRange(name, 0, 4096, func() error { return volmount.ZeroOut(loop, 0, 4096) })
	if n, lerr := volmount.QueueLimit(loop, "write_zeroes_max_bytes"); err != nil || lerr != nil || n != 0 {
		logf("warning: could not turn write-zeroes off on %s (%v, %v, write_zeroes_max_bytes %d): its zeroings cannot be told from discards, so fstrim will be refused", loop, err, lerr, n)
	}
}

// writeZeroesOff reports whether every loop device over file has write-zeroes off, so
// that the punched holes it sends are discards (see prepareDiscards). It only reads
// sysfs: safe from a goroutine that serves FUSE.
func writeZeroesOff(file string) bool {
	loops, err := volmount.LoopsOf(file)
	if err != nil || len(loops) == 0 {
		return false
	}
	for _, l := range loops {
		if n, err := volmount.QueueLimit(l, "write_zeroes_max_bytes"); err != nil || n != 0 {
			return false
		}
	}
	return true
}

// teardownMount takes the stack down in order: the file system (waiting for open files
// to be closed, lazily after a few seconds), the loop device, the FUSE mount. It runs
// on the main goroutine, never on one that serves FUSE.
func teardownMount(mp, loop string, srv *fusefs.Server, stopNow func() bool, logf func(string, ...any)) error {
	st, err := volmount.Inspect(mp)
	if err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	if st.Mounted() && st.Loop == loop {
		err := volmount.Unmount(mp, false)
		for try := 0; err != nil && errors.Is(err, syscall.EBUSY) && try < 20; try++ {
			time.Sleep(250 * time.Millisecond)
			err = volmount.Unmount(mp, false)
		}
		if errors.Is(err, syscall.EBUSY) {
			logf("%v; detaching it lazily: the volume is served until the last file there is closed", err)
			err = volmount.Unmount(mp, true)
		}
		if err != nil {
			return fail(exitcodes.Busy, err, "")
		}
	}
	// Auto-clear detaches the loop device once the file system is gone; Detach waits
	// for it, and ends it if something else attached it.
	for {
		err := volmount.Detach(loop)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EBUSY) {
			return fail(exitcodes.Failure, err, "")
		}
		logf("waiting for %s to be released (files still open on the detached file system); signal again to stop now", loop)
		if stopNow() {
			return fail(exitcodes.Busy, err, "files were still open on "+mp+"; the FUSE mount stays until they are closed")
		}
	}
	if err := srv.Unmount(); err != nil {
		return fail(exitcodes.Busy, err, "")
	}
	srv.Wait()
	removeFUSEDir(srv.Dir())
	return nil
}

// removeFUSEDir removes a FUSE directory that `atrest mount` made under
// fusefs.DefaultRoot once it is unmounted and empty; one given with --fuse-dir stays.
func removeFUSEDir(dir string) {
	if filepath.Dir(dir) == fusefs.DefaultRoot {
		os.Remove(dir) // fails, harmlessly, if still mounted or not empty
	}
}

// signal tells the parent that the volume is mounted, then lets go of the terminal:
// the child logs to syslog from then on.
func (r *readiness) signal(out *switchWriter) {
	if r.sent || r.pipe == nil {
		return
	}
	r.sent = true
	fmt.Fprintln(r.pipe, "READY")
	r.pipe.Close()
	var w io.Writer = io.Discard
	if sl, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_WARNING, "atrest-mount"); err == nil {
		w = sl
	}
	out.set(w)
	if null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
		for _, fd := range []int{0, 1, 2} {
			unix.Dup2(int(null.Fd()), fd)
		}
		null.Close()
	}
}

// childReport is what a background child sends its parent when it fails before it is
// mounted.
type childReport struct {
	Code  int    `json:"code"`
	Error string `json:"error"`
	Hint  string `json:"hint,omitempty"`
}

// runMountChild is runMount in the child of --background: readiness and errors go to
// the parent over the pipe on descriptor fd, which prints them.
func runMountChild(ctx context.Context, o mountOptions, fd string) error {
	n, err := strconv.Atoi(fd)
	if err != nil || n < 3 {
		return usagef("%s=%q: not a descriptor", readyFDEnv, fd)
	}
	r := &readiness{pipe: os.NewFile(uintptr(n), "ready")}
	err = runMount(ctx, o, r)
	if err != nil && !r.sent {
		rep := childReport{Code: exitcodes.Failure, Error: err.Error()}
		var ce *cmdError
		if errors.As(err, &ce) {
			rep.Code, rep.Hint = ce.code, ce.hint
		}
		json.NewEncoder(r.pipe).Encode(rep)
		r.pipe.Close()
		os.Exit(rep.Code) // the parent prints the error
	}
	return err
}

// runMountBackground starts this command again as a child in a session of its own and
// returns when the child says that the volume is mounted, or with the child's error.
func runMountBackground(o mountOptions) error {
	rd, wr, err := os.Pipe()
	if err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	defer rd.Close()
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NOTIFY_SOCKET=") { // the parent is the one systemd sees
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, readyFDEnv+"=3")
	cmd.ExtraFiles = []*os.File{wr}
	cmd.Stdout, cmd.Stderr = os.Stdout, o.log // until it is mounted
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		wr.Close()
		return fail(exitcodes.Failure, fmt.Errorf("start the background process: %w", err), "")
	}
	wr.Close()
	msg, _ := io.ReadAll(rd) // EOF: the child said something and closed it, or exited
	if strings.TrimSpace(string(msg)) == "READY" {
		cmd.Process.Release()
		return nil
	}
	werr := cmd.Wait()
	var rep childReport
	if err := json.Unmarshal(msg, &rep); err == nil && rep.Error != "" {
		return fail(rep.Code, errors.New(rep.Error), rep.Hint)
	}
	return fail(exitcodes.Failure, fmt.Errorf("the background mount process ended before the volume was mounted (%v)", werr), "")
}
