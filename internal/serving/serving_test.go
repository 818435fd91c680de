package serving

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/nbd"
)

func start(t *testing.T) (*nbd.Server, net.Listener, string) {
	t.Helper()
	srv := nbd.NewServer(nbd.ServerConfig{})
	if err := srv.AddExport(nbd.Export{Name: "m", Device: blockdev.NewMem(1 << 20)}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return srv, l, sock
}

// TestRunServesUntilStop: the server answers once Ready ran; the stop drains and Run
// returns nil; a client's write before the stop is on the device.
func TestRunServesUntilStop(t *testing.T) {
	srv, l, sock := start(t)
	ctx, stop := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, srv, Options{Listeners: []net.Listener{l}, Ready: func(context.Context) (string, error) {
			close(ready)
			return "serving", nil
		}})
	}()
	<-ready
	c, err := nbd.Dial(context.Background(), "unix:"+sock, nbd.ClientOptions{Export: "m", Connections: 1, ReconnectTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt([]byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	stop()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after the stop: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after the stop")
	}
}

// TestRunFailures: a failed readiness check and an error on Errors end the run with
// their error; a failed check after the stop signal is no failure.
func TestRunFailures(t *testing.T) {
	bad := errors.New("self-check failed")
	srv, l, _ := start(t)
	if err := Run(context.Background(), srv, Options{Listeners: []net.Listener{l}, Ready: func(context.Context) (string, error) { return "", bad }}); !errors.Is(err, bad) {
		t.Fatalf("Run with a failing check: %v", err)
	}
	srv, l, _ = start(t)
	errs := make(chan error, 1)
	errs <- bad
	stopped := false
	if err := Run(context.Background(), srv, Options{Listeners: []net.Listener{l}, Errors: errs, Stopping: func() { stopped = true }}); !errors.Is(err, bad) || !stopped {
		t.Fatalf("Run with an error on Errors: %v (Stopping called: %v)", err, stopped)
	}
	srv, l, _ = start(t)
	ctx, stop := context.WithCancel(context.Background())
	if err := Run(ctx, srv, Options{Listeners: []net.Listener{l}, Ready: func(context.Context) (string, error) { stop(); return "", bad }}); err != nil {
		t.Fatalf("a check that failed after the stop signal: %v", err)
	}
}
