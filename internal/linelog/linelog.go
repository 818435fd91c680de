// Package linelog is a log/slog handler for people reading a terminal or a journal:
// one line per record, "PREFIX: MESSAGE key=value ...", with no time (the journal
// stamps lines) and the level only where it matters ("warning: ", "error: " before
// the message). Values with spaces, quotes or '=' are quoted as Go strings. cmd/atrest
// prints its logs through it, and tests collect logs with it.
//
// A Handler is safe for concurrent use; the handlers derived from it by WithAttrs and
// WithGroup share its writer and its lock, so lines never interleave.
package linelog

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"time"
	"unicode"
)

// Handler writes records as lines. Make one with New.
type Handler struct {
	mu     *sync.Mutex
	w      io.Writer
	prefix string
	level  slog.Leveler
	attrs  []byte // " key=value" pairs preformatted by WithAttrs
	group  string // key prefix, "g." per WithGroup
}

// New returns a handler that writes records of level at least level (nil: Info) to
// w, each line starting with prefix + ": " (nothing if prefix is empty).
func New(w io.Writer, prefix string, level slog.Leveler) *Handler {
	if level == nil {
		level = slog.LevelInfo
	}
	if prefix != "" {
		prefix += ": "
	}
	return &Handler{mu: new(sync.Mutex), w: w, prefix: prefix, level: level}
}

// Enabled reports whether a record of level l is written.
func (h *Handler) Enabled(_ context.Context, l slog.Level) bool {
	return l >= h.level.Level()
}

// Handle writes one line.
func (h *Handler) Handle(_ context.Context, r slog.Record) error {
	b := make([]byte, 0, 128)
	b = append(b, h.prefix...)
	switch {
	case r.Level >= slog.LevelError:
		b = append(b, "error: "...)
	case r.Level >= slog.LevelWarn:
		b = append(b, "warning: "...)
	}
	b = append(b, r.Message...)
	b = append(b, h.attrs...)
	r.Attrs(func(a slog.Attr) bool {
		b = appendAttr(b, h.group, a)
		return true
	})
	b = append(b, '\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := h.w.Write(b)
	return err
}

// WithAttrs returns a handler that adds attrs to every line.
func (h *Handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	h2 := *h
	h2.attrs = append([]byte(nil), h.attrs...)
	for _, a := range attrs {
		h2.attrs = appendAttr(h2.attrs, h.group, a)
	}
	return &h2
}

// WithGroup returns a handler that qualifies the keys that follow with name.
func (h *Handler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	h2 := *h
	h2.group = h.group + name + "."
	return &h2
}

func appendAttr(b []byte, group string, a slog.Attr) []byte {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		if a.Key != "" {
			group += a.Key + "."
		}
		for _, ga := range v.Group() {
			b = appendAttr(b, group, ga)
		}
		return b
	}
	if a.Equal(slog.Attr{}) {
		return b
	}
	b = append(b, ' ')
	b = append(b, group...)
	b = append(b, a.Key...)
	b = append(b, '=')
	var s string
	switch v.Kind() {
	case slog.KindString:
		s = v.String()
	case slog.KindTime:
		s = v.Time().Format(time.RFC3339Nano)
	case slog.KindAny:
		s = fmt.Sprint(v.Any())
	default:
		s = v.String()
	}
	if needsQuote(s) {
		return strconv.AppendQuote(b, s)
	}
	return append(b, s...)
}

func needsQuote(s string) bool {
	if s == "" {
		return true
	}
	for _, r := range s {
		if r == ' ' || r == '=' || r == '"' || r == '\\' || !unicode.IsPrint(r) {
			return true
		}
	}
	return false
}
