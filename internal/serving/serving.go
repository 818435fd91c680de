// Package serving runs an NBD daemon's lifecycle, the same for `atrest serve` (a
// node.Node) and the benchmark's unencrypted server (an nbd.Server): serve every
// listener, announce readiness to systemd once the caller's check passed, and on the
// stop signal drain and flush before returning.
package serving

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/atrest/atrest/internal/sdnotify"
	"github.com/atrest/atrest/nbd"
)

// Target is what is served: *node.Node and *nbd.Server are.
type Target interface {
	// Serve serves one listener until Shutdown or Close (nbd.ErrServerClosed).
	Serve(ctx context.Context, l net.Listener) error
	// Shutdown stops gracefully: no new request, the requests in flight answered (until
	// ctx ends), the devices flushed.
	Shutdown(ctx context.Context) error
	// Close stops at once.
	Close() error
}

// Options of Run. Listeners is required; every other zero value is usable.
type Options struct {
	Listeners []net.Listener
	// Logger gets the lifecycle's lines ("stopping: ...", "stopped"); nil discards.
	Logger *slog.Logger
	// Drain bounds the graceful stop (default 30 s); then connections are closed.
	Drain time.Duration
	// Ready, if set, runs once every listener serves; the daemon is announced ready
	// (sd_notify READY=1, with the STATUS it returns) only when it succeeds. Its error
	// ends the run (unless the stop signal came first: then the run ends without error).
	Ready func(ctx context.Context) (status string, err error)
	// Errors, if set, ends the run with the first error it delivers (a control API that
	// failed).
	Errors <-chan error
	// Stopping, if set, is called when the stop begins, before the drain (to stop taking
	// control requests first).
	Stopping func()
}

// Run serves t on every listener until ctx ends (SIGTERM, SIGINT: a graceful stop,
// which returns nil if the drain and the flush went well) or serving fails (its error).
// Serve gets a context that ctx's end does not cancel: when its context ends, Serve
// closes every connection at once, and requests the devices already executed would go
// unanswered; the stop is Shutdown's: stop reading, answer, flush.
func Run(ctx context.Context, t Target, o Options) (err error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Drain <= 0 {
		o.Drain = 30 * time.Second
	}
	serveCtx := context.WithoutCancel(ctx)
	var wg sync.WaitGroup
	serveErr := make(chan error, len(o.Listeners))
	for _, l := range o.Listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := t.Serve(serveCtx, l); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				serveErr <- fmt.Errorf("serve on %s: %w", l.Addr(), err)
			}
		}()
	}
	stopping := func() {
		if o.Stopping != nil {
			o.Stopping()
		}
	}
	if o.Ready != nil {
		status, err := o.Ready(ctx)
		if err != nil {
			stopping()
			t.Close()
			wg.Wait()
			if ctx.Err() != nil {
				return nil // a stop before readiness, not a failure
			}
			return err
		}
		if _, err := sdnotify.Ready(status); err != nil {
			log.Warn("sd_notify", "err", err)
		}
	}

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	case err = <-o.Errors: // a nil channel never delivers
	}
	sdnotify.Stopping()
	log.Info("stopping: draining requests and flushing drives")
	stopping()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.Drain)
	defer cancel()
	if serr := t.Shutdown(sctx); serr != nil {
		log.Error("shutdown", "err", serr)
		err = errors.Join(err, serr)
	}
	wg.Wait()
	if err == nil {
		log.Info("stopped")
	}
	return err
}
