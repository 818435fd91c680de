package main

import (
	"context"
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
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/sdnotify"
	"github.com/atrest/atrest/mountstack"
	"github.com/atrest/atrest/nbd"
)

// readyFDEnv names the descriptor on which a background child reports readiness (or
// its error) to the parent that started it.
const readyFDEnv = "ATREST_MOUNT_READY_FD"

type mountOptions struct {
	nbd        string // NBD address or URI; "" is the local daemon's socket
	export     string // overrides the URI's export
	fsType     string
	options    string // mount(8) -o options
	fuseDir    string // "" is fusefs.DefaultRoot/<escaped mount point>
	ioTimeout  time.Duration
	mountpoint string
	background bool
	takeOver   bool
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
			"--allow-discards, and is refused (\"not supported\") otherwise.\n\n" +
			"When the NBD server goes away, the client reconnects and replays the writes not yet\n" +
			"flushed; each request waits for it at most --io-timeout, then fails (EIO in the file\n" +
			"system), and so do later requests, at once, until the server is back. Keep it longer\n" +
			"than the time the server itself holds requests for a missing drive.\n" +
			"SIGUSR1 (sent by 'atrest umount' when the server is unreachable) abandons the volume:\n" +
			"the process records what it had not flushed and exits at once, taking nothing down.\n\n" +
			"A volume has one writer at a time (docs/nbd.md): the daemon refuses a second mount of\n" +
			"it, and so does this node for a volume it has mounted already. --take-over is for a\n" +
			"writer that is dead or hung elsewhere: the daemon ends its connections and this mount\n" +
			"becomes the writer; if the other writer is alive after all, it loses what it has not\n" +
			"flushed and its file system sees I/O errors (two ext4 mounts of one volume corrupt it).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "nbd", Usage: "NBD server: nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT, unix:PATH or tcp:HOST:PORT (default: unix:" + defaultSocket + ")"},
			&cli.StringFlag{Name: "export", Usage: "export (volume) name; overrides the one in --nbd (default: the server's default export)"},
			&cli.StringFlag{Name: "fs", Value: "ext4", Usage: "file system type; only ext4 is ever created"},
			&cli.StringFlag{Name: "options", Aliases: []string{"o"}, Usage: "mount options, as for mount -o (e.g. noatime)"},
			&cli.BoolFlag{Name: "background", Usage: "return once mounted; a child process serves the volume"},
			&cli.StringFlag{Name: "fuse-dir", Usage: "directory for the FUSE mount (default: " + fusefs.DefaultRoot + "/<escaped mount point>)"},
			&cli.DurationFlag{Name: "io-timeout", Value: mountstack.DefaultIOTimeout, Usage: "how long a request waits for the NBD server to come back before it fails with EIO"},
			&cli.BoolFlag{Name: "take-over", Usage: "end the connections of the volume's current writer (dead or hung elsewhere) and become the writer"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return usagef("mount takes one MOUNTPOINT")
			}
			o := mountOptions{
				nbd: c.String("nbd"), export: c.String("export"), fsType: c.String("fs"),
				options: c.String("options"), fuseDir: c.String("fuse-dir"), mountpoint: c.Args().First(),
				background: c.Bool("background"), takeOver: c.Bool("take-over"), log: c.App.ErrWriter,
				ioTimeout: c.Duration("io-timeout"),
			}
			if o.ioTimeout <= 0 {
				return usagef("--io-timeout must be positive, not %v", o.ioTimeout)
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

// runMount sets the stack up (package mountstack), serves it until SIGTERM/SIGINT (ctx)
// or until the FUSE mount is ended from outside, then takes it down in order. ready is
// nil in the foreground.
func runMount(ctx context.Context, o mountOptions, ready *readiness) error {
	out := &switchWriter{w: o.log}
	log := newLogger(out, "atrest mount")

	mp, err := mountstack.AbsMountpoint(o.mountpoint)
	if err != nil {
		return usageError(err)
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
	fuseDir := o.fuseDir
	if fuseDir != "" {
		if fuseDir, err = filepath.Abs(fuseDir); err != nil {
			return usageError(err)
		}
	}

	// The process that serves the FUSE file must be an I/O flusher (see fusefs); this
	// re-executes the process on success, so it comes before anything that must not
	// happen twice.
	if err := fusefs.EnsureIOFlusher(); err != nil {
		log.Warn("not running as an I/O flusher: under memory pressure the mount can deadlock; run as root with CAP_SYS_RESOURCE", "err", err)
	}
	if ready != nil && ready.pipe != nil {
		// Kept across EnsureIOFlusher's re-execution, dropped from here on: not for
		// mkfs, mount and the like.
		os.Unsetenv(readyFDEnv)
		unix.CloseOnExec(int(ready.pipe.Fd()))
	}

	// Signals are counted here as well as cancelling ctx: a second one cuts short a
	// teardown that waits for open files (stopNow). (Counted rather than received: the
	// first signal reaches ctx and this channel in no fixed order.)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	stopNow, stop := context.WithCancel(context.Background())
	defer stop()
	abandon := make(chan os.Signal, 1)
	signal.Notify(abandon, syscall.SIGUSR1)
	defer signal.Stop(abandon)
	go func() {
		n := 0
		for range sigs {
			if n++; n >= 2 {
				stop()
			}
		}
	}()

	if o.takeOver {
		log.Warn(fmt.Sprintf("--take-over: the current writer of export %q loses its connections to the volume. If it is alive, "+
			"the writes it has not flushed are lost and its file system sees I/O errors; if it is an ext4 mount, "+
			"unmount it (or let it fail) before you use this mount: two ext4 mounts of one volume corrupt it", addr.Export))
	}
	s, err := mountstack.Mount(ctx, mountstack.Options{
		Mountpoint: mp, Address: addr, FSType: o.fsType, MountOptions: o.options, FUSEDir: fuseDir,
		IOTimeout: o.ioTimeout,
		TakeOver:  o.takeOver,
		Logger:    log,
	})
	if err != nil {
		return mountError(err, mp)
	}
	if _, err := sdnotify.Ready(fmt.Sprintf("%s mounted on %s", s.Name(), mp)); err != nil {
		log.Warn(err.Error())
	}
	if ready != nil {
		ready.signal(out)
	}
	select {
	case <-ctx.Done():
		sdnotify.Stopping()
	case <-s.Done():
		// Ended from outside: Close only cleans up.
	case <-abandon:
		return abandonStack(s, addr, log)
	}
	// Close waits for the server to flush; SIGUSR1 still abandons meanwhile.
	closed := make(chan error, 1)
	go func() { closed <- s.Close(stopNow) }()
	select {
	case err := <-closed:
		return mountError(err, mp)
	case <-abandon:
		return abandonStack(s, addr, log)
	}
}

// abandonStack gives the stack up on SIGUSR1 (see mountstack.Stack.Abandon) and
// returns the error the process exits with, after it logged it (a background child's
// stderr goes nowhere).
func abandonStack(s *mountstack.Stack, addr nbd.Address, log *slog.Logger) error {
	writes, bytes, err := s.Abandon()
	if err != nil {
		log.Error("recording what was lost in the state file failed", "err", err)
	}
	msg := fmt.Sprintf("abandoned the volume on %s on SIGUSR1 (what 'atrest umount' sends when the NBD server %s is unreachable): %s", s.Mountpoint(), addr, lostWrites(writes, bytes))
	log.Warn(msg)
	return fail(exitcodes.IO, errors.New(msg), "")
}

// lostWrites says what an abandoned NBD client held that the server had not flushed.
func lostWrites(writes int, bytes int64) string {
	n, are := fmt.Sprintf("%d writes", writes), "are"
	switch {
	case writes == 0:
		return "every write the mount had sent was flushed to the server"
	case writes == 1:
		n, are = "1 write", "is"
	}
	if bytes >= 0 {
		n += fmt.Sprintf(" (%d bytes)", bytes)
	}
	return fmt.Sprintf("%s not yet flushed to the server %s lost", n, are)
}

// mountError gives an error of mountstack.Mount or Close its exit code and hint. Close
// joins the teardown's error and the flush's: the teardown's decides.
func mountError(err error, mp string) error {
	if err == nil {
		return nil
	}
	cause := err
	if j, ok := err.(interface{ Unwrap() []error }); ok && len(j.Unwrap()) > 0 {
		cause = j.Unwrap()[0]
	}
	umount := "'atrest umount " + mp + "'"
	switch {
	case errors.Is(cause, mountstack.ErrMounted):
		return fail(exitcodes.Busy, err, "unmount it first ("+umount+" for an atrest volume)")
	case errors.Is(cause, mountstack.ErrServed):
		return fail(exitcodes.Busy, err, umount+" stops it")
	case errors.Is(cause, mountstack.ErrLeftBehind):
		return fail(exitcodes.Busy, err, umount+" cleans up after it")
	case errors.Is(cause, mountstack.ErrFUSEDirInUse):
		return fail(exitcodes.Busy, err, "another 'atrest mount' uses it, or a crashed one left it: 'atrest umount' its mount point, or choose another --fuse-dir")
	case errors.Is(cause, mountstack.ErrVolumeHeld):
		return fail(exitcodes.Busy, err, "a volume has one writer at a time: unmount it there first; if that writer is dead or hung, "+
			"'atrest mount --take-over' ends its connections (a live writer then loses what it has not flushed)")
	case errors.Is(cause, mountstack.ErrVolumeMounted):
		return fail(exitcodes.Busy, err, "a volume is mounted once per node: use that mount, or 'atrest umount' it first")
	case errors.Is(cause, mountstack.ErrFilesOpen):
		return fail(exitcodes.Busy, err, "files were still open on "+mp+"; the FUSE mount stays until they are closed")
	case errors.Is(cause, mountstack.ErrBusy):
		return fail(exitcodes.Busy, err, "")
	case errors.Is(cause, mountstack.ErrUnknownExport):
		return fail(exitcodes.DriveMissing, err, "'atrest drive list' shows the volumes; 'atrest serve' must serve the drive")
	case errors.Is(cause, mountstack.ErrUnreachable):
		return fail(exitcodes.IO, err, "is the daemon running ('systemctl status atrest', or 'atrest serve')?")
	case errors.Is(cause, mountstack.ErrNotEmpty):
		return fail(exitcodes.Exists, err, "the volume holds something else; atrest never formats over it")
	case errors.Is(cause, mountstack.ErrUnsupportedFS):
		return usageError(err)
	case errors.Is(cause, mountstack.ErrFlush):
		return fail(exitcodes.IO, err, "")
	}
	return fail(exitcodes.Failure, err, "")
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
