package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/node/api"
)

// daemonClient is the daemon's control API, as a node.Service.
type daemonClient interface {
	node.Service
	Close() error
}

// dialDaemon returns the daemon's control API at control if a daemon answers there and
// serves the keystore in dir; nil otherwise: no daemon, a daemon of another keystore,
// or one this user may not ask (the command then works on the keystore directly, which
// says what is wrong if it cannot).
func dialDaemon(ctx context.Context, dir, control string) daemonClient {
	if control == "" {
		return nil
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// One round trip: the identity says both that a daemon answers and which keystore
	// it serves.
	c := api.NewClient(control)
	id, err := c.Identity(dctx)
	if err != nil {
		c.Close()
		if !errors.Is(err, api.ErrNoDaemon) {
			warnf("the daemon's control socket %s: %v; working on the keystore directly", control, err)
		}
		return nil
	}
	if !sameDir(id.Keystore, dir) {
		c.Close()
		return nil
	}
	return c
}

// sameDir reports whether two paths name the same directory.
func sameDir(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	if ab, err := filepath.Abs(b); err == nil {
		b = ab
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// serveControl serves the node's control API on o.control until the returned stop is
// called; an error of the API server after it started goes to errs. An empty o.control
// serves none.
func serveControl(ctx context.Context, n *node.Node, o serveOptions, log *slog.Logger, errs chan<- error) (stop func(), err error) {
	if o.control == "" {
		return func() {}, nil
	}
	l, err := api.Listen(o.control)
	if err != nil {
		if errors.Is(err, api.ErrInUse) {
			return nil, fail(exitcodes.Busy, err, "another 'atrest serve' answers there: stop it first, or choose another --control path")
		}
		return nil, fail(exitcodes.Failure, fmt.Errorf("control socket: %w", err), "")
	}
	s := api.NewServer(n, log)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errs <- fmt.Errorf("control API on %s: %w", o.control, err)
		}
	}()
	stopped := false
	return func() {
		if stopped {
			return
		}
		stopped = true
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.drain)
		defer cancel()
		s.Shutdown(sctx)
		<-done
		os.Remove(o.control)
	}, nil
}
