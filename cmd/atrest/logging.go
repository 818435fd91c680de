package main

import (
	"io"
	"log/slog"

	"github.com/atrest/atrest/internal/linelog"
)

// newLogger returns the one logger of a command, which it passes down to the packages
// it uses: lines "atrest serve: MESSAGE key=value ..." on w (the command's stderr), of
// level Info and above, with "warning: " or "error: " before the message of a warning
// or an error (package linelog).
func newLogger(w io.Writer, command string) *slog.Logger {
	return slog.New(linelog.New(w, command, slog.LevelInfo))
}
