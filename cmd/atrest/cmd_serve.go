package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/sdnotify"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/registry"
)

// defaultSocket is where the daemon listens when no --listen is given and systemd
// passes no socket.
const defaultSocket = "/run/atrest/nbd.sock"

type serveOptions struct {
	keystore string
	listen   []string
	drives   []string // paths or glob patterns; none: the drives the keystore knows
	readOnly bool
	direct   bool
	shared   bool // --shared-writers
	drain    time.Duration
	log      io.Writer
}

func init() {
	register(&cli.Command{
		Name:      "serve",
		Usage:     "unlock drives and serve their volumes over NBD (the daemon)",
		ArgsUsage: "[DRIVE|GLOB...]",
		Description: "Opens the keystore, unlocks the given drives (paths or glob patterns; by default every\n" +
			"drive the keystore knows) and serves each volume as an NBD export named after it. When\n" +
			"there is one volume it is also the default export \"\". Listens on " + defaultSocket + "\n" +
			"(mode 0600) unless --listen says otherwise or systemd passes sockets (LISTEN_FDS).\n" +
			"Tells systemd READY=1 once every export answers; on SIGTERM stops accepting, answers\n" +
			"the requests in flight, flushes the drives and exits.\n\n" +
			"A volume has one writer at a time, whatever export name, socket or connection it comes\n" +
			"through (docs/nbd.md): atrest mount is refused while another writer holds it, other\n" +
			"clients get read-only access. --shared-writers turns the rule off: for benchmarks with\n" +
			"several independent writers and for clients that coordinate themselves (cluster file\n" +
			"systems). Two ext4 mounts of one volume corrupt it.",
		Flags: []cli.Flag{
			keystoreFlag(),
			&cli.StringSliceFlag{Name: "listen", Usage: "unix:PATH or tcp:HOST:PORT (repeatable; TCP carries plaintext: keep it on loopback or a trusted network)"},
			&cli.BoolFlag{Name: "read-only", Usage: "export every volume read-only"},
			&cli.BoolFlag{Name: "direct-io", Usage: "open the drives with O_DIRECT (block devices and disk file systems; not tmpfs)"},
			&cli.BoolFlag{Name: "shared-writers", Usage: "let several clients write to a volume at once (DANGEROUS for ext4: only for benchmarks and self-coordinating clients)"},
			&cli.DurationFlag{Name: "drain-timeout", Value: 30 * time.Second, Usage: "how long SIGTERM waits for requests in flight"},
		},
		Action: func(c *cli.Context) error {
			return runServe(c.Context, serveOptions{
				keystore: c.String("keystore"),
				listen:   c.StringSlice("listen"),
				drives:   c.Args().Slice(),
				readOnly: c.Bool("read-only"),
				direct:   c.Bool("direct-io"),
				shared:   c.Bool("shared-writers"),
				drain:    c.Duration("drain-timeout"),
				log:      c.App.ErrWriter,
			})
		},
	})
}

// runServe serves until ctx ends (SIGTERM, SIGINT), then shuts down gracefully.
func runServe(ctx context.Context, o serveOptions) error {
	log := newLogger(o.log, "atrest serve")
	logf := func(format string, args ...any) { log.Info(fmt.Sprintf(format, args...)) }

	if len(o.listen) == 0 {
		o.listen = []string{"unix:" + defaultSocket}
	}
	for _, spec := range o.listen {
		if err := checkListenSpec(spec); err != nil {
			return err
		}
	}
	ks, reg, err := openOffline(ctx, o.keystore)
	if err != nil {
		return keystoreError(err)
	}
	paths, err := drivePaths(reg, o.drives)
	if err != nil {
		return err
	}

	// ready receives once per listener being served; the server calls Ready.
	ready := make(chan struct{}, 64)
	srv := nbd.NewServer(nbd.ServerConfig{Logger: log, Ready: func(net.Addr) { ready <- struct{}{} }})
	var drives []*drive.Unlocked
	closeDrives := func() {
		for _, d := range drives {
			if err := d.Device.Close(); err != nil {
				logf("close %s: %v", d.Path, err)
			}
		}
	}
	defer closeDrives()
	if err := sameDrive(paths); err != nil {
		return err
	}
	for _, p := range paths {
		// Held exclusively while served: no format or adopt replaces its header
		// under the daemon, and no second daemon serves it.
		d, err := drive.Unlock(p, drive.UnlockOptions{ClusterUUID: ks.ClusterUUID(), Keys: ks.Keys, ReadOnly: o.readOnly, Direct: o.direct, Exclusive: true})
		if err != nil {
			return unlockError(ks, p, err)
		}
		drives = append(drives, d)
		for _, other := range drives[:len(drives)-1] {
			if other.Token.Volume == d.Token.Volume {
				return usagef("drives %s and %s both hold volume %q: a volume is served from one drive (mirrors are not supported yet)", other.Path, d.Path, d.Token.Volume)
			}
		}
	}
	names := exportNames(drives)
	for _, d := range drives {
		vid, err := uuid.Parse(d.Token.VolumeUUID)
		if err != nil {
			return fail(exitcodes.Header, fmt.Errorf("drive %s: the atrest token's volume UUID %q: %w", d.Path, d.Token.VolumeUUID, err), "")
		}
		for _, name := range names[d] {
			err := srv.AddExport(nbd.Export{
				Name:          name,
				Description:   fmt.Sprintf("atrest volume %s (drive %s)", d.Token.Volume, d.UUID),
				Device:        d.Device,
				ReadOnly:      o.readOnly,
				VolumeID:      nbd.VolumeID(vid),
				SharedWriters: o.shared,
			})
			if err != nil {
				return err
			}
		}
		logf("unlocked %s: volume %q (%s), %d bytes, %d-byte sectors, key %s", d.Path, d.Token.Volume, d.Token.VolumeUUID, d.Device.Size(), d.SectorSize, d.KeyID)
	}
	if o.shared && !o.readOnly {
		logf("warning: --shared-writers: several clients may write to a volume at once; two ext4 mounts of one volume corrupt it")
	}

	listeners, err := serveListeners(o.listen)
	if err != nil {
		return listenError(err, o.listen)
	}
	for _, l := range listeners {
		if a, ok := l.Addr().(*net.TCPAddr); ok && !a.IP.IsLoopback() {
			logf("warning: listening on %s, which is not a loopback address: NBD carries the volumes' plaintext unencrypted and unauthenticated; anyone who reaches it reads and writes them (keep it on a trusted network, or tunnel it)", a)
		}
	}

	// Serve gets a context that SIGTERM does not cancel: when its context ends, Serve
	// closes every connection at once, and requests the drives already executed would
	// go unanswered. The stop is Shutdown's below: stop reading, answer, flush.
	serveCtx := context.WithoutCancel(ctx)
	var wg sync.WaitGroup
	serveErr := make(chan error, len(listeners))
	for _, l := range listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(serveCtx, l); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				serveErr <- fmt.Errorf("serve on %s: %w", l.Addr(), err)
			}
		}()
	}
	abort := func(err error) error {
		srv.Close()
		wg.Wait()
		return err
	}
	for range listeners {
		select {
		case <-ready:
		case err := <-serveErr:
			return abort(fail(exitcodes.Failure, err, ""))
		case <-ctx.Done():
			return abort(nil)
		}
	}
	if err := selfCheck(ctx, listeners[0].Addr(), srv.Exports()); err != nil {
		if ctx.Err() != nil {
			// SIGTERM or SIGINT during the check: a stop before readiness, not a failure.
			return abort(nil)
		}
		return abort(fail(exitcodes.Failure, err, ""))
	}
	var addrs []string
	for _, l := range listeners {
		addrs = append(addrs, l.Addr().Network()+":"+l.Addr().String())
	}
	logf("serving %d export(s) %q on %s", len(srv.Exports()), srv.Exports(), strings.Join(addrs, ", "))
	if _, err := sdnotify.Ready(fmt.Sprintf("serving %d volume(s)", len(drives))); err != nil {
		logf("sd_notify: %v", err)
	}

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	}
	sdnotify.Stopping()
	logf("stopping: draining requests and flushing drives")
	sctx, cancel := context.WithTimeout(context.Background(), o.drain)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil {
		logf("shutdown: %v", serr)
		err = errors.Join(err, serr)
	}
	wg.Wait()
	if err != nil {
		return fail(exitcodes.IO, err, "")
	}
	logf("stopped")
	return nil
}

// drivePaths expands the DRIVE arguments (paths or glob patterns), or lists the active
// drives of the registry when there are none (a stale drive is never served again).
func drivePaths(reg *registry.Registry, args []string) ([]string, error) {
	var paths []string
	if len(args) == 0 {
		for _, d := range reg.Drives {
			if d.State == registry.DriveActive {
				paths = append(paths, d.Path)
			}
		}
		if len(paths) == 0 {
			return nil, fail(exitcodes.DriveMissing, errors.New("the keystore knows no drives"), "format one with 'atrest drive format', or name drives on the command line")
		}
		return paths, nil
	}
	for _, a := range args {
		matches, err := filepath.Glob(a)
		if err != nil {
			return nil, usagef("drive pattern %q: %v", a, err)
		}
		if len(matches) == 0 {
			if !hasGlobMeta(a) {
				return nil, fail(exitcodes.DriveMissing, fmt.Errorf("drive %s does not exist", a), "check the path; a pulled drive must be reattached first")
			}
			return nil, fail(exitcodes.DriveMissing, fmt.Errorf("no drive matches %q", a), "")
		}
		paths = append(paths, matches...)
	}
	slices.Sort(paths)
	return slices.Compact(paths), nil
}

// sameDrive refuses two DRIVE arguments that are one drive (a link and its target):
// the second exclusive open would fail against the first.
func sameDrive(paths []string) error {
	seen := make([]os.FileInfo, len(paths))
	for i, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			continue // Unlock says what is wrong with it
		}
		for j, other := range seen[:i] {
			if other != nil && os.SameFile(fi, other) {
				return usagef("drives %s and %s are the same drive", paths[j], p)
			}
		}
		seen[i] = fi
	}
	return nil
}

// hasGlobMeta reports whether a DRIVE argument is a pattern rather than a path
// (filepath.Match's special characters).
func hasGlobMeta(s string) bool { return strings.ContainsAny(s, `*?[\`) }

// unlockError maps a failure to unlock the drive at path to an exit code and a hint.
func unlockError(ks *keystore.Keystore, path string, err error) error {
	if !strings.Contains(err.Error(), path) { // the keystore's errors mostly name it
		err = fmt.Errorf("unlock %s: %w", path, err)
	}
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fail(exitcodes.DriveMissing, err, "reattach the drive, or name the drives to serve on the command line")
	case errors.Is(err, luks2.ErrWrongKey):
		return fail(exitcodes.Key, err, fmt.Sprintf("the master key of %s does not open this drive: is --keystore this cluster's current keystore (a backup from before a key rotation holds a retired key)?", ks.Dir()))
	}
	return keystoreError(err)
}

// checkListenSpec checks the form of a --listen value before anything is opened;
// nbd.Listen reports what only listening can tell (a socket in use, a bad address).
func checkListenSpec(spec string) error {
	network, addr, _ := strings.Cut(spec, ":")
	if (network != "unix" && network != "tcp") || addr == "" {
		return usagef("--listen %q: want unix:PATH or tcp:HOST[:PORT] (e.g. unix:%s or tcp:127.0.0.1:%d)", spec, defaultSocket, nbd.DefaultPort)
	}
	return nil
}

// listenError maps a failure to listen to an exit code: an address or socket that
// another process serves is Busy.
func listenError(err error, specs []string) error {
	if errors.Is(err, syscall.EADDRINUSE) {
		return fail(exitcodes.Busy, err, "another process listens there: stop it or choose another --listen address")
	}
	for _, spec := range specs {
		// nbd.Listen refuses a unix socket that a live server answers on (and
		// removes a stale one); tell that case apart by asking the socket.
		if path, ok := strings.CutPrefix(spec, "unix:"); ok && strings.Contains(err.Error(), path) {
			if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
				c.Close()
				return fail(exitcodes.Busy, err, "another 'atrest serve' (or another NBD server) already serves "+path+": stop it first, or choose another --listen path")
			}
		}
	}
	return fail(exitcodes.Failure, err, "")
}

// exportNames gives each drive's export names: its volume's name, and also "" (the
// default export) when it is the only one.
func exportNames(drives []*drive.Unlocked) map[*drive.Unlocked][]string {
	m := make(map[*drive.Unlocked][]string, len(drives))
	for _, d := range drives {
		m[d] = []string{d.Token.Volume}
	}
	if len(drives) == 1 {
		m[drives[0]] = append(m[drives[0]], "")
	}
	return m
}

// serveListeners returns the sockets passed by systemd, or else those of the --listen
// specs.
func serveListeners(specs []string) ([]net.Listener, error) {
	ls, err := sdnotify.Listeners()
	if err != nil || len(ls) > 0 {
		return ls, err
	}
	for _, spec := range specs {
		l, err := nbd.Listen(spec)
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// selfCheck connects to the server as a client and reads the first sector of every
// export, so that readiness is announced only when the exports really answer. It says
// it never writes, so it never holds a volume against a mount.
func selfCheck(ctx context.Context, addr net.Addr, exports []string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, name := range exports {
		c, err := nbd.Dial(ctx, addr.Network()+":"+addr.String(), nbd.ClientOptions{Export: name, Connections: 1, ReconnectTimeout: -1, ReadOnly: true, Description: "atrest serve's self-check"})
		if err != nil {
			return fmt.Errorf("self-check of export %q: %w", name, err)
		}
		buf := make([]byte, min(4096, c.Size()))
		_, err = c.ReadAt(buf, 0)
		c.Close()
		if err != nil {
			return fmt.Errorf("self-check of export %q: read: %w", name, err)
		}
	}
	return nil
}
