package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/mountstack"
)

// TestMountErrorCodes: the exit code and hint that each kind of mountstack error gets,
// with its message unchanged (scripts and systemd rely on the codes; the e2e tests
// check them end to end for the cases they can provoke).
func TestMountErrorCodes(t *testing.T) {
	const mp = "/srv/vol1"
	kind := func(k error) error { return fmt.Errorf("something at %s: %w", mp, k) }
	check := func(what string, err error, code int, hint string) {
		t.Helper()
		var ce *cmdError
		if !errors.As(err, &ce) {
			t.Fatalf("%s: %v is not a cmdError", what, err)
		}
		if ce.code != code || !strings.Contains(ce.hint, hint) || (hint == "" && ce.hint != "") {
			t.Errorf("%s: code %d, hint %q; want %d, %q", what, ce.code, ce.hint, code, hint)
		}
	}
	for _, c := range []struct {
		kind error
		code int
		hint string
	}{
		{mountstack.ErrMounted, exitcodes.Busy, "unmount it first ('atrest umount /srv/vol1' for an atrest volume)"},
		{mountstack.ErrServed, exitcodes.Busy, "'atrest umount /srv/vol1' stops it"},
		{mountstack.ErrLeftBehind, exitcodes.Busy, "'atrest umount /srv/vol1' cleans up after it"},
		{mountstack.ErrFUSEDirInUse, exitcodes.Busy, "choose another --fuse-dir"},
		{mountstack.ErrVolumeHeld, exitcodes.Busy, "'atrest mount --take-over' ends its connections"},
		{mountstack.ErrVolumeMounted, exitcodes.Busy, "a volume is mounted once per node"},
		{mountstack.ErrFilesOpen, exitcodes.Busy, "files were still open on /srv/vol1"},
		{mountstack.ErrBusy, exitcodes.Busy, ""},
		{mountstack.ErrUnknownExport, exitcodes.DriveMissing, "'atrest drive list'"},
		{mountstack.ErrUnreachable, exitcodes.IO, "is the daemon running"},
		{mountstack.ErrNotEmpty, exitcodes.Exists, "atrest never formats over it"},
		{mountstack.ErrUnsupportedFS, exitcodes.Usage, "atrest help"},
		{mountstack.ErrFlush, exitcodes.IO, ""},
		{errors.New("plain"), exitcodes.Failure, ""},
	} {
		err := mountError(kind(c.kind), mp)
		check("mount: "+c.kind.Error(), err, c.code, c.hint)
		if err.Error() != kind(c.kind).Error() {
			t.Errorf("mount: message %q, want %q", err, kind(c.kind))
		}
	}
	if mountError(nil, mp) != nil {
		t.Error("mountError(nil) is not nil")
	}
	// Close joins the teardown's error and the flush's: the teardown's decides, as it
	// did when the two were joined in cmd.
	flush := kind(mountstack.ErrFlush)
	check("join busy+flush", mountError(errors.Join(kind(mountstack.ErrFilesOpen), flush), mp), exitcodes.Busy, "files were still open")
	check("join plain+flush", mountError(errors.Join(errors.New("inspect"), flush), mp), exitcodes.Failure, "")
	check("join flush only", mountError(errors.Join(nil, flush), mp), exitcodes.IO, "")

	for _, c := range []struct {
		kind error
		code int
		hint string
	}{
		{mountstack.ErrNotAtrest, exitcodes.Failure, "use umount(8)"},
		{mountstack.ErrFilesOpen, exitcodes.Busy, "close the files open on /srv/vol1 and retry"},
		{mountstack.ErrTeardownTimeout, exitcodes.Busy, "its log says more"},
		{mountstack.ErrState, exitcodes.Failure, "remove the state file if no 'atrest mount' serves /srv/vol1"},
		{errors.New("plain"), exitcodes.Failure, ""},
	} {
		err := umountError(kind(c.kind), mp)
		check("umount: "+c.kind.Error(), err, c.code, c.hint)
		if err.Error() != kind(c.kind).Error() {
			t.Errorf("umount: message %q, want %q", err, kind(c.kind))
		}
	}
}
