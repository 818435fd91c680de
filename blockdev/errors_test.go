package blockdev_test

import (
	"errors"
	"fmt"
	"io"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

func TestClassify(t *testing.T) {
	classes := []error{blockdev.ErrGone, blockdev.ErrMedium, blockdev.ErrTimeout}
	for _, c := range []struct {
		err  error
		want error // nil: no class
	}{
		{syscall.ENODEV, blockdev.ErrGone},
		{syscall.ENXIO, blockdev.ErrGone},
		{syscall.ESHUTDOWN, blockdev.ErrGone},
		{syscall.ENOTCONN, blockdev.ErrGone},
		{syscall.EIO, blockdev.ErrMedium},
		{syscall.EILSEQ, blockdev.ErrMedium},
		{syscall.ENODATA, blockdev.ErrMedium},
		{syscall.EBADMSG, blockdev.ErrMedium},
		{syscall.EREMOTEIO, blockdev.ErrMedium},
		{syscall.ETIMEDOUT, blockdev.ErrTimeout},
		{fmt.Errorf("pread: %w", syscall.EIO), blockdev.ErrMedium},
		{syscall.ENOSPC, nil},
		{syscall.EINVAL, nil},
		{io.ErrUnexpectedEOF, nil},
	} {
		got := blockdev.Classify(c.err)
		if !errors.Is(got, c.err) {
			t.Errorf("Classify(%v) = %v, which lost the error", c.err, got)
		}
		for _, class := range classes {
			if errors.Is(got, class) != (class == c.want) {
				t.Errorf("Classify(%v) = %v: matches %v is %v", c.err, got, class, !(class == c.want))
			}
		}
		if c.want == nil && got != c.err {
			t.Errorf("Classify(%v) = %v, want it unchanged", c.err, got)
		}
	}
	// An error that has a class keeps it: an EIO that says the device is gone stays gone.
	gone := fmt.Errorf("%w: %w", blockdev.ErrGone, syscall.EIO)
	if got := blockdev.Classify(gone); got != gone {
		t.Errorf("Classify(%v) = %v, want it unchanged", gone, got)
	}
	if blockdev.Classify(nil) != nil {
		t.Error("Classify(nil) is not nil")
	}
}
