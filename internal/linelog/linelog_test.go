package linelog

import (
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestLines(t *testing.T) {
	var b strings.Builder
	log := slog.New(New(&b, "atrest serve", nil))
	log.Debug("not shown")
	log.Info("serving 2 export(s)", "export", "vol0", "peer", "127.0.0.1:5000")
	log.Warn("connection lost", "err", errors.New(`export "vol0": gone`), "empty", "")
	log.With("volume", "v1").WithGroup("nbd").Error("device error", "offset", 4096, "took", 1500*time.Millisecond)
	log.Info("group", slog.Group("g", "a", 1, "b", true), slog.Group("", "flat", "x=y"))
	want := `atrest serve: serving 2 export(s) export=vol0 peer=127.0.0.1:5000
atrest serve: warning: connection lost err="export \"vol0\": gone" empty=""
atrest serve: error: device error volume=v1 nbd.offset=4096 nbd.took=1.5s
atrest serve: group g.a=1 g.b=true flat="x=y"
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// TestNoPrefix: without a prefix a line is the message and its attributes.
func TestNoPrefix(t *testing.T) {
	var b strings.Builder
	slog.New(New(&b, "", slog.LevelDebug)).Debug("stopped")
	if b.String() != "stopped\n" {
		t.Errorf("%q", b.String())
	}
}

// TestConcurrentLines: lines from several goroutines, through derived handlers, never
// interleave.
func TestConcurrentLines(t *testing.T) {
	var b strings.Builder
	log := slog.New(New(&b, "p", nil))
	var wg sync.WaitGroup
	for i := range 8 {
		l := log.With("g", i)
		wg.Go(func() {
			for range 100 {
				l.Info("a line of some length", "k", strings.Repeat("x", 50))
			}
		})
	}
	wg.Wait()
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != 800 {
		t.Fatalf("%d lines", len(lines))
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "p: a line of some length g=") || !strings.HasSuffix(l, strings.Repeat("x", 50)) {
			t.Fatalf("interleaved line %q", l)
		}
	}
}
