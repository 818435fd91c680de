package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/sdnotify"
	"github.com/atrest/atrest/internal/serving"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/node"
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
	control  string // the control API's socket; "" for none
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
			&cli.StringFlag{Name: "control", Value: defaultControl, EnvVars: []string{"ATREST_CONTROL"}, Usage: "the control API's unix socket (root only; \"\" for none)"},
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
				control:  c.String("control"),
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
	n, err := node.Open(ctx, node.Config{
		Keystore: o.keystore, Logger: log, Version: version(),
		Drives: o.drives, ReadOnly: o.readOnly, Direct: o.direct, SharedWriters: o.shared,
	})
	if err != nil {
		return keystoreError(err)
	}
	if err := n.Start(ctx); err != nil {
		return serveError(n.Dir(), err)
	}
	defer n.Close()
	if len(n.Exports()) == 0 {
		logf("the keystore knows no drives yet: each drive formatted with 'atrest drive format' while the daemon runs is served at once")
	}
	if o.shared && !o.readOnly {
		logf("warning: --shared-writers: several clients may write to a volume at once; two ext4 mounts of one volume corrupt it")
	}

	// The control socket first: a daemon refused there has not created its NBD sockets,
	// and one whose NBD sockets are refused removes its control socket again (stop).
	controlErr := make(chan error, 1)
	stopControl, err := serveControl(ctx, n, o, log, controlErr)
	if err != nil {
		return err
	}
	defer stopControl()
	listeners, err := serveListeners(o.listen)
	if err != nil {
		return listenError(err, o.listen)
	}
	for _, l := range listeners {
		if a, ok := l.Addr().(*net.TCPAddr); ok && !a.IP.IsLoopback() {
			logf("warning: listening on %s, which is not a loopback address: NBD carries the volumes' plaintext unencrypted and unauthenticated; anyone who reaches it reads and writes them (keep it on a trusted network, or tunnel it)", a)
		}
	}

	err = serving.Run(ctx, n, serving.Options{
		Listeners: listeners, Logger: log, Drain: o.drain, Errors: controlErr, Stopping: stopControl,
		Ready: func(ctx context.Context) (string, error) {
			if err := n.SelfCheck(ctx, listeners[0].Addr()); err != nil {
				return "", fail(exitcodes.Failure, err, "")
			}
			var addrs []string
			for _, l := range listeners {
				addrs = append(addrs, l.Addr().Network()+":"+l.Addr().String())
			}
			logf("serving %d export(s) %q on %s", len(n.Exports()), n.Exports(), strings.Join(addrs, ", "))
			return fmt.Sprintf("serving %d export(s)", len(n.Exports())), nil
		},
	})
	var ce *cmdError
	if err != nil && !errors.As(err, &ce) {
		return fail(exitcodes.IO, err, "")
	}
	return err
}

// serveError maps a failure of node.Start to an exit code and a hint.
func serveError(dir string, err error) error {
	switch {
	case errors.Is(err, node.ErrNoDrive), errors.Is(err, os.ErrNotExist):
		return fail(exitcodes.DriveMissing, err, "reattach the drive, or name the drives to serve on the command line")
	case errors.Is(err, node.ErrInvalid):
		return usageError(err)
	case errors.Is(err, node.ErrConflict):
		return usageError(err)
	case errors.Is(err, node.ErrWrongKey):
		return fail(exitcodes.Key, err, fmt.Sprintf("the master key of %s does not open this drive: is --keystore this cluster's current keystore (a backup from before a key rotation holds a retired key)?", dir))
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
	if errors.Is(err, nbd.ErrSocketInUse) {
		return fail(exitcodes.Busy, err, "another 'atrest serve' (or another NBD server) already serves it: stop it first, or choose another --listen path")
	}
	return fail(exitcodes.Failure, err, "")
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
