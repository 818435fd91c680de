package testutil

import (
	"fmt"
	"strings"
	"sync"
)

// Log collects the lines of a Logf callback (a logger option of the package under
// test), from any goroutine.
type Log struct {
	mu  sync.Mutex
	buf strings.Builder
}

// Logf appends one line.
func (l *Log) Logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(&l.buf, format+"\n", args...)
}

// String returns every line so far.
func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
