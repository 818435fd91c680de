package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/atrest/atrest/internal/exitcodes"
)

// cmdError carries an error to main with the exit code it maps to and, where a fix is
// known, a hint for the administrator. Only the cmd package builds these: the libraries
// return plain wrapped errors.
type cmdError struct {
	err  error
	code int
	hint string
}

func (e *cmdError) Error() string { return e.err.Error() }
func (e *cmdError) Unwrap() error { return e.err }

// fail wraps err with an exit code and an optional hint; a nil err stays nil.
func fail(code int, err error, hint string) error {
	if err == nil {
		return nil
	}
	return &cmdError{err: err, code: code, hint: hint}
}

// usageError marks a command-line mistake.
func usageError(err error) error {
	return fail(exitcodes.Usage, err, "run 'atrest help' or 'atrest COMMAND --help' for usage")
}

// usagef builds a usage error from a format.
func usagef(format string, args ...any) error {
	return usageError(fmt.Errorf(format, args...))
}

// report prints err (if any) with its hint to w and returns the exit code for it.
func report(w io.Writer, err error) int {
	if err == nil {
		return exitcodes.OK
	}
	code, hint := exitcodes.Failure, ""
	var ce *cmdError
	if errors.As(err, &ce) {
		code, hint = ce.code, ce.hint
	}
	fmt.Fprintf(w, "atrest: %v\n", err)
	if hint != "" {
		fmt.Fprintf(w, "hint: %s\n", hint)
	}
	return code
}
