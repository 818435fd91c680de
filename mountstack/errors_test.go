package mountstack

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
)

// TestMark: a marked error keeps its message and what it wraps, and matches its kinds
// (the busy ones ErrBusy as well), also inside a join, as the atrest command relies on
// to choose exit codes.
func TestMark(t *testing.T) {
	if mark(nil, ErrBusy) != nil {
		t.Fatal("mark(nil) is not nil")
	}
	inner := fmt.Errorf("unmount /srv/v: %w", syscall.EBUSY)
	err := mark(inner, ErrFilesOpen)
	if err.Error() != inner.Error() {
		t.Errorf("message %q, want %q", err, inner)
	}
	for _, want := range []error{ErrFilesOpen, ErrBusy, syscall.EBUSY} {
		if !errors.Is(err, want) {
			t.Errorf("%v does not match %v", err, want)
		}
	}
	for _, not := range []error{ErrServed, ErrFlush, ErrNotAtrest} {
		if errors.Is(err, not) {
			t.Errorf("%v matches %v", err, not)
		}
	}
	if errors.Is(mark(errors.New("x"), ErrFlush), ErrBusy) {
		t.Error("ErrFlush matches ErrBusy")
	}
	for _, k := range []error{ErrMounted, ErrServed, ErrLeftBehind, ErrFUSEDirInUse, ErrFilesOpen, ErrTeardownTimeout} {
		if !errors.Is(mark(errors.New("x"), k), ErrBusy) {
			t.Errorf("%v does not match ErrBusy", k)
		}
	}
	j := errors.Join(errors.New("teardown"), mark(errors.New("flush"), ErrFlush))
	if !errors.Is(j, ErrFlush) || j.Error() != "teardown\nflush" {
		t.Errorf("join: %q, ErrFlush %v", j, errors.Is(j, ErrFlush))
	}
}
