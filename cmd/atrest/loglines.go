package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
)

// lineHandler is the slog.Handler of the daemon's log on stderr (journald adds the
// time): "atrest serve: MESSAGE", and the error of the record, if any, after a colon.
// Levels above info are said in words ("warning: ...", "error: ..."); debug records are
// dropped unless verbose.
type lineHandler struct {
	mu      *sync.Mutex
	w       io.Writer
	prefix  string
	verbose bool
	attrs   []slog.Attr
}

func newLineLogger(w io.Writer, prefix string, verbose bool) *slog.Logger {
	return slog.New(&lineHandler{mu: &sync.Mutex{}, w: w, prefix: prefix, verbose: verbose})
}

func (h *lineHandler) Enabled(_ context.Context, l slog.Level) bool {
	return h.verbose || l >= slog.LevelInfo
}

func (h *lineHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(h.prefix)
	switch {
	case r.Level >= slog.LevelError:
		b.WriteString("error: ")
	case r.Level >= slog.LevelWarn && !strings.HasPrefix(r.Message, "warning:"):
		b.WriteString("warning: ")
	}
	b.WriteString(r.Message)
	add := func(a slog.Attr) bool {
		if a.Key == "err" {
			fmt.Fprintf(&b, ": %v", a.Value.Any())
		}
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	b.WriteByte('\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := io.WriteString(h.w, b.String())
	return err
}

func (h *lineHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &c
}

func (h *lineHandler) WithGroup(string) slog.Handler { return h }
