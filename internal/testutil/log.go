package testutil

import (
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/atrest/atrest/internal/linelog"
)

// Log collects the lines of a logger (the Logger option of the package under test),
// from any goroutine. Lines are formatted by linelog, without a prefix: "MESSAGE
// key=value ...". With TB set, each line also goes to the test's log.
type Log struct {
	TB  testing.TB
	mu  sync.Mutex
	buf strings.Builder
}

// Logger returns a logger, of every level, whose lines l collects.
func (l *Log) Logger() *slog.Logger {
	return slog.New(linelog.New(l, "", slog.LevelDebug))
}

// Write appends lines.
func (l *Log) Write(p []byte) (int, error) {
	if l.TB != nil {
		l.TB.Log(strings.TrimSuffix(string(p), "\n"))
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// String returns every line so far.
func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// Logger returns a logger, of every level, whose lines go to the test's log.
func Logger(tb testing.TB) *slog.Logger {
	return slog.New(linelog.New(tbWriter{tb}, "", slog.LevelDebug))
}

type tbWriter struct{ tb testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.tb.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
