package testutil

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
)

// KilledBy returns the signal that ended a process, or 0 if it exited.
func KilledBy(ps *os.ProcessState) syscall.Signal {
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return ws.Signal()
	}
	return 0
}

// ExitStatus decodes the error of exec.Cmd's Run or Wait: nil is exit code 0; an
// *exec.ExitError gives the exit code (-1 when a signal ended the process) and the
// signal; any other error (the program could not be started) is returned as err.
func ExitStatus(runErr error) (code int, sig syscall.Signal, err error) {
	var ee *exec.ExitError
	switch {
	case runErr == nil:
		return 0, 0, nil
	case errors.As(runErr, &ee):
		return ee.ExitCode(), KilledBy(ee.ProcessState), nil
	default:
		return 0, 0, runErr
	}
}
