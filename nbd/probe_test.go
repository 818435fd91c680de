package nbd

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

// TestProbe: Probe accepts a server that offers the export and
// leaves no trace in its log; it fails with ErrNoExport for an export the server does
// not have, and with an error, within its context, for no server at all and for a
// socket whose listener never greets (a hung server).
func TestProbe(t *testing.T) {
	checkLeaks(t)
	var log testutil.Log
	ts := startServer(t, ServerConfig{Logger: log.Logger()}, Export{Name: "vol", Device: blockdev.NewMem(1 << 20)})
	probe := func(addr string) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return Probe(ctx, addr)
	}
	if err := probe("nbd+unix:///vol?socket=" + ts.sock); err != nil {
		t.Errorf("probe of a served export: %v", err)
	}
	if err := probe("nbd+unix:///nope?socket=" + ts.sock); !errors.Is(err, ErrNoExport) {
		t.Errorf("probe of an unknown export: %v, want ErrNoExport", err)
	}
	if err := probe("unix:" + filepath.Join(shortDir(t), "nobody.sock")); err == nil {
		t.Error("probe of a socket nobody listens on succeeded")
	}

	// A listener that accepts (the kernel does, into the backlog) and never greets.
	hung := filepath.Join(shortDir(t), "hung.sock")
	l, err := net.Listen("unix", hung)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	start := time.Now()
	if err := probe("unix:" + hung); err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("probe of a server that never greets: %v, want a deadline error", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the probe of a hung server took %v, beyond its context", d)
	}

	// The server noticed nothing worth a line: the probes ended their handshakes.
	deadline := time.Now().Add(5 * time.Second)
	for ts.Stats().Connections > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if strings.TrimSpace(log.String()) != "" {
		t.Errorf("the server logged the probes:\n%s", log.String())
	}
}
