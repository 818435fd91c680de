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
		{mountstack.ErrNotAtrest, exitcodes.Busy, "use umount(8)"},
		{mountstack.ErrNotMounted, exitcodes.Failure, ""},
		{mountstack.ErrFilesOpen, exitcodes.Busy, "close the files open on /srv/vol1 and retry"},
		{mountstack.ErrTeardownTimeout, exitcodes.Busy, "its log says more"},
		{mountstack.ErrInterrupted, exitcodes.Failure, "run 'atrest umount /srv/vol1' again to finish"},
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

// TestUmountReport: what `atrest umount` says and exits with for each outcome that is
// not a plain ordered stop (which says nothing): a volume abandoned because its server
// was gone is an I/O error that says what was lost; a stale record or a crash's
// leftovers removed are a success that says what was cleaned up; writes that a mount
// process recorded lost make any outcome an I/O error.
func TestUmountReport(t *testing.T) {
	const mp = "/srv/vol1"
	gone := errors.New("probe unix:/run/atrest/nbd.sock: connection refused")
	for _, c := range []struct {
		name string
		res  mountstack.Unmounted
		code int
		want []string
	}{
		{"stopped", mountstack.Unmounted{Outcome: mountstack.Stopped}, exitcodes.OK, nil},
		{"abandoned", mountstack.Unmounted{Outcome: mountstack.Abandoned, Unreachable: gone, Lost: &mountstack.Loss{Writes: 3, Bytes: 12288}},
			exitcodes.IO, []string{"the NBD server is unreachable (probe unix:/run/atrest/nbd.sock: connection refused): the volume on /srv/vol1 was detached",
				"3 writes (12288 bytes) not yet flushed to the server are lost", "whatever the file system had not yet written out is lost too", "replays the file system's journal"}},
		{"abandoned, all flushed", mountstack.Unmounted{Outcome: mountstack.Abandoned, Unreachable: gone, Lost: &mountstack.Loss{}},
			exitcodes.IO, []string{"every write the mount had sent was flushed to the server"}},
		{"abandoned, killed", mountstack.Unmounted{Outcome: mountstack.Abandoned, Unreachable: gone, Killed: true, PID: 42},
			exitcodes.IO, []string{"the mount process (pid 42) had to be killed"}},
		{"abandoned, files open", mountstack.Unmounted{Outcome: mountstack.Abandoned, Unreachable: gone, Lost: &mountstack.Loss{}, Held: []string{"/dev/loop7"}},
			exitcodes.IO, []string{"files still open there keep /dev/loop7 attached until they are closed"}},
		{"cleaned up", mountstack.Unmounted{Outcome: mountstack.CleanedUp, PID: 42}, exitcodes.OK,
			[]string{"atrest umount: the mount process (pid 42) of /srv/vol1 had exited: removed what it left"}},
		{"stale", mountstack.Unmounted{Outcome: mountstack.StaleState, PID: 42}, exitcodes.OK,
			[]string{"atrest umount: nothing was mounted on /srv/vol1; removed the stale record of an 'atrest mount' (pid 42) that had exited"}},
		{"unrecorded", mountstack.Unmounted{Outcome: mountstack.Unrecorded}, exitcodes.OK,
			[]string{"atrest umount: /srv/vol1 had no record of its 'atrest mount'; took the atrest stack found there down"}},
		{"stopped, flush failed", mountstack.Unmounted{Outcome: mountstack.Stopped, PID: 42, Server: "unix:/s", Lost: &mountstack.Loss{Writes: 1, Bytes: 4096}},
			exitcodes.IO, []string{"unmounted /srv/vol1, but its mount process (pid 42) could not flush to the NBD server unix:/s: 1 write (4096 bytes) not yet flushed to the server is lost"}},
		{"stopped, flush failed, nothing waiting", mountstack.Unmounted{Outcome: mountstack.Stopped, PID: 42, Server: "unix:/s", Lost: &mountstack.Loss{}},
			exitcodes.IO, []string{"could not flush to the NBD server unix:/s: no write was left waiting for the server; writes that failed before returned errors"}},
		{"cleaned up, loss recorded", mountstack.Unmounted{Outcome: mountstack.CleanedUp, PID: 42, Server: "unix:/s", Lost: &mountstack.Loss{Writes: 2, Bytes: -1}},
			exitcodes.IO, []string{"the mount process (pid 42) of /srv/vol1 had exited and could not flush to the NBD server unix:/s: 2 writes not yet flushed"}},
	} {
		var out strings.Builder
		code := report(&out, umountReport(c.res, mp, &out))
		if code != c.code {
			t.Errorf("%s: exit %d, want %d\n%s", c.name, code, c.code, out.String())
		}
		for _, w := range c.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%s: output lacks %q:\n%s", c.name, w, out.String())
			}
		}
		if c.want == nil && out.Len() > 0 {
			t.Errorf("%s: says %q, want nothing", c.name, out.String())
		}
	}
}
