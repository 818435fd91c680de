package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/securefile"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/node"
)

// keystoreFlag is the --keystore flag of every command that uses the keystore.
func keystoreFlag() *cli.StringFlag {
	return &cli.StringFlag{
		Name:    "keystore",
		Usage:   "keystore directory on the boot drive",
		EnvVars: []string{keystore.EnvDir},
		Value:   keystore.DefaultDir,
	}
}

// keystoreError maps an error of the node (in this process or through the daemon's
// control API: both carry its class, node.ErrorCode) to an exit code and a hint.
func keystoreError(err error) error {
	if err == nil {
		return nil
	}
	var ce *cmdError
	if errors.As(err, &ce) {
		return err
	}
	var unsafe *securefile.UnsafeError
	if errors.As(err, &unsafe) && unsafe.Fix != "" {
		return fail(exitcodes.Keystore, err, unsafe.Fix+" (the keystore must be root's alone: directory 0700, files 0600, no symlinks)")
	}
	var missing *keystore.MissingError
	if errors.As(err, &missing) && missing.Rewrapping {
		return fail(exitcodes.DriveMissing, err, "reattach the drive and rerun: a drive the rotation was rewrapping must come back")
	}
	code, _ := node.ErrorCode(err)
	if h, ok := errorHints[code]; ok {
		return fail(h.exit, err, h.hint)
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		hint := ""
		switch errno {
		case syscall.EIO, syscall.ENXIO, syscall.ENODEV, syscall.ENOMEDIUM:
			hint = "a drive does not answer: is it attached and healthy? The kernel log (dmesg) says more"
		}
		return fail(exitcodes.IO, err, hint)
	}
	return err
}

// errorHints gives the exit code and hint of each class of node error (node.ErrorCode).
var errorHints = map[string]struct {
	exit int
	hint string
}{
	"busy":               {exitcodes.Busy, "wait for the other atrest command to finish"},
	"rotation-running":   {exitcodes.Busy, "wait for it to finish: 'atrest encryption-status' shows its progress"},
	"in-use":             {exitcodes.Busy, "the drive is in use: 'atrest serve' serves it, it is mounted, or another program holds it; stop that first (nothing was written)"},
	"no-keystore":        {exitcodes.Keystore, "create one with 'atrest init', or point --keystore (ATREST_KEYSTORE) at it"},
	"keystore-unsafe":    {exitcodes.Keystore, "the keystore must be root's alone: directory 0700, files 0600, no symlinks"},
	"stray-key":          {exitcodes.Keystore, "remove it if it is not a key you kept, and rerun"},
	"keystore-corrupt":   {exitcodes.Keystore, "restore the keystore from a backup; atrest never rewrites a keystore it cannot read"},
	"rotation-under-way": {exitcodes.Failure, "'atrest rotate-encryption-keys' finishes it; then rerun"},
	"not-migrated":       {exitcodes.Keystore, "any command that changes the keystore (drive format, rotate-encryption-keys) migrates it"},
	"exists":             {exitcodes.Exists, ""},
	"holds-data":         {exitcodes.Exists, "formatting destroys it; rerun with --force if that is what you want"},
	"drive-missing":      {exitcodes.DriveMissing, "reattach the drive and rerun, or rerun with --force to leave it locked to the old master key for good"},
	"no-drive":           {exitcodes.DriveMissing, "reattach the drive, or name the drives to serve on the command line"},
	"foreign":            {exitcodes.Key, "a drive of another cluster, or one formatted by cryptsetup: bring it in with 'atrest drive adopt --key-file KEY PATH'"},
	"wrong-key":          {exitcodes.Key, "check the key file: it must be the one the drive was formatted or last opened with"},
	"header-damaged":     {exitcodes.Header, "restore the header from a backup (cryptsetup luksHeaderRestore); nothing was written"},
	"truncated":          {exitcodes.Header, "a truncated image, or a header copied from a larger drive: put back the whole image or the right drive; nothing was written"},
	"unsupported":        {exitcodes.Header, ""},
	"not-luks":           {exitcodes.Header, ""},
	"invalid":            {exitcodes.Usage, "run 'atrest help' or 'atrest COMMAND --help' for usage"},
	"ambiguous":          {exitcodes.Usage, "name the drive by more of its UUID, or by its path"},
	"not-found":          {exitcodes.Failure, "'atrest drive list' and 'atrest encryption-status' list what the node knows"},
	"not-exist":          {exitcodes.Failure, ""},
	"permission":         {exitcodes.Failure, ""},
}

// onTerminal reports whether w is a terminal: progress is shown only there.
func onTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressf prints a progress line on a terminal and nothing elsewhere.
func progressf(w io.Writer, format string, args ...any) {
	if onTerminal(w) {
		fmt.Fprintf(w, format+"\n", args...)
	}
}

// crashEnv names the test hook that kills the process at a named point: "NAME" (the
// first time the point is reached), "NAME:K" (the K-th time) or "N" (the N-th point of
// any name). It exists for the crash-safety tests; with it unset nothing happens.
const crashEnv = "ATREST_TEST_CRASH_AT"

// crashPoints counts the points reached, by name and in all.
var crashPoints = map[string]int{}

// crashPoint kills the process with SIGKILL if ATREST_TEST_CRASH_AT names this point.
func crashPoint(name string) {
	want := os.Getenv(crashEnv)
	if want == "" {
		return
	}
	crashPoints[name]++
	crashPoints[""]++
	hit := false
	if n, err := strconv.Atoi(want); err == nil {
		hit = crashPoints[""] == n
	} else {
		wname, k, _ := strings.Cut(want, ":")
		kk := 1
		if k != "" {
			kk, _ = strconv.Atoi(k)
		}
		hit = wname == name && crashPoints[name] == kk
	}
	if hit {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not delivered synchronously
	}
}

// parseSize parses a size with an optional binary (K, M, G, T, KiB, ...) or decimal
// (KB, MB, GB, TB) suffix.
func parseSize(s string) (int64, error) {
	num := strings.TrimRightFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	unit := strings.ToUpper(s[len(num):])
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional unit (K, M, G, T, KiB, MB, ...)", s)
	}
	mult := map[string]int64{
		"": 1, "B": 1,
		"K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40,
		"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
	}[unit]
	if mult == 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: unknown unit or too large", s)
	}
	return n * mult, nil
}
