package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/node"
)

// commandPaths lists every command and subcommand as the words that run it, but for
// urfave/cli's own help commands (which other tests' runs add to the shared commands).
func commandPaths(prefix []string, cmds []*cli.Command) [][]string {
	var out [][]string
	for _, c := range cmds {
		if c.Name == "help" {
			continue
		}
		p := append(append([]string{}, prefix...), c.Name)
		out = append(out, p)
		out = append(out, commandPaths(p, c.Subcommands)...)
	}
	return out
}

// ksCluster builds the binary and makes a keystore with it in a temporary directory.
func ksCluster(t *testing.T) (bin, dir, ks string) {
	t.Helper()
	bin, dir = ksBuild(t), t.TempDir()
	ks = filepath.Join(dir, "keystore")
	ksMust(t, bin, ks, "init")
	return bin, dir, ks
}

// TestUnknownFlagOneLine: an unknown flag gets the same answer from every command and
// subcommand: one error line and one hint line, exit code 2, no help text.
func TestUnknownFlagOneLine(t *testing.T) {
	bin := ksBuild(t)
	ks := filepath.Join(t.TempDir(), "keystore")
	paths := commandPaths(nil, newApp().Commands)
	if len(paths) < 10 {
		t.Fatalf("only %d commands: %v", len(paths), paths)
	}
	for _, p := range append(paths, nil) {
		args := append(p, "--no-such-flag")
		r := ksRun(t, bin, ks, nil, args...)
		lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
		if r.code != exitcodes.Usage || r.stdout != "" || len(lines) != 2 ||
			!strings.HasPrefix(lines[0], "atrest: flag provided but not defined: -no-such-flag") || !strings.HasPrefix(lines[1], "hint: ") {
			t.Errorf("atrest %s: exit %d, stdout %q, stderr %q; want exit 2, one error line and a hint", strings.Join(args, " "), r.code, r.stdout, r.stderr)
		}
	}
}

// TestDriveUsageErrors: command-line mistakes of drive format and adopt are usage
// errors (exit code 2) that say what is wrong.
func TestDriveUsageErrors(t *testing.T) {
	bin, dir, ks := ksCluster(t)
	img := filepath.Join(dir, "d.img")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", img)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"drive", "adopt", img}, exitcodes.Usage, "drive adopt needs --key-file"},
		{[]string{"drive", "adopt", "--key-file", filepath.Join(dir, "nonexistent"), img}, exitcodes.Usage, "--key-file: stat " + filepath.Join(dir, "nonexistent")},
		{[]string{"drive", "adopt", "--key-file", dir, img}, exitcodes.Usage, "is a directory"},
		{[]string{"drive", "format", dir}, exitcodes.Usage, dir + " is a directory"},
		{[]string{"drive", "format", "--force", dir}, exitcodes.Usage, dir + " is a directory"},
		{[]string{"drive", "format", "/dev/null"}, exitcodes.Usage, "neither a block device nor a regular file"},
		{[]string{"drive", "format", "--create", "1M", filepath.Join(dir, "small.img")}, exitcodes.Usage, "too small"},
		{[]string{"drive", "format", filepath.Join(dir, "nothing.img")}, exitcodes.DriveMissing, "no such file"},
	} {
		r := ksRun(t, bin, ks, nil, c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.want) || strings.Contains(r.stderr, "unknown command") {
			t.Errorf("atrest %s: exit %d, stderr %q; want exit %d saying %q", strings.Join(c.args, " "), r.code, r.stderr, c.code, c.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "small.img")); !os.IsNotExist(err) {
		t.Errorf("a refused --create left its image: %v", err)
	}
}

// TestFormatCreateCleanup: a drive format --create that fails after creating its image
// removes it, so that the rerun works; one that did not create the file leaves it.
func TestFormatCreateCleanup(t *testing.T) {
	bin, dir, ks := ksCluster(t)
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", "--volume", "taken", filepath.Join(dir, "first.img"))
	img := filepath.Join(dir, "second.img")
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", "--create", "20M", "--volume", "taken", img), exitcodes.Exists, `volume "taken": already in the registry`)
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("the failed format left %s behind (%v)", img, err)
	}
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", "--volume", "other", img)

	// --create --force over an existing file that the command did not create: a
	// failure leaves the file.
	kept := filepath.Join(dir, "kept.img")
	if err := os.WriteFile(kept, []byte("someone's file"), 0o600); err != nil {
		t.Fatal(err)
	}
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", "--create", "20M", "--force", "--volume", "taken", kept), exitcodes.Exists, `volume "taken": already in the registry`)
	if _, err := os.Stat(kept); err != nil {
		t.Fatalf("a failed format removed a file it did not create: %v", err)
	}
}

// TestKeystoreMessages: keystore errors say each thing once, with the fix as the hint.
func TestKeystoreMessages(t *testing.T) {
	bin, dir, ks := ksCluster(t)
	checkOnce := func(r ksResult, code int, want ...string) {
		t.Helper()
		lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
		if r.code != code || len(lines) != 2 || strings.Contains(lines[0], "hint") || strings.Contains(r.stderr, "the a ") {
			t.Errorf("exit %d, stderr %q; want exit %d, an error line without a hint and one hint line", r.code, r.stderr, code)
		}
		for _, w := range want {
			if strings.Count(r.stderr, w) != 1 {
				t.Errorf("stderr %q: want %q once", r.stderr, w)
			}
		}
	}
	// A corrupt keystore.json: the restore hint once.
	corrupt := filepath.Join(dir, "corrupt")
	copyKeystore(t, ks, corrupt)
	if err := os.WriteFile(filepath.Join(corrupt, keystore.StateFile), []byte(`{"format":"atrest-keystore","version":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	checkOnce(ksRun(t, bin, corrupt, nil, "encryption-status"), exitcodes.Keystore, "restore", "corrupt keystore")
	// A symlinked keystore: the fix as the hint.
	link := filepath.Join(dir, "link")
	if err := os.Symlink(ks, link); err != nil {
		t.Fatal(err)
	}
	checkOnce(ksRun(t, bin, link, nil, "encryption-status"), exitcodes.Keystore, "hint: replace it with the directory it points to", "is a symlink")
	// A master.key readable by others.
	if err := os.Chmod(filepath.Join(ks, keystore.MasterKeyFile), 0o644); err != nil {
		t.Fatal(err)
	}
	checkOnce(ksRun(t, bin, ks, nil, "encryption-status"), exitcodes.Keystore, "hint: chmod 0600 "+filepath.Join(ks, keystore.MasterKeyFile))
}

// copyKeystore copies a keystore directory, keeping it root's alone.
func copyKeystore(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Mkdir(to, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{keystore.MasterKeyFile, keystore.StateFile} {
		b, err := os.ReadFile(filepath.Join(from, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDriveListAsServe: drive list says present only for a drive that serve opens; a
// truncated image is not, and the detail says why.
func TestDriveListAsServe(t *testing.T) {
	bin, dir, ks := ksCluster(t)
	good, cut := filepath.Join(dir, "good.img"), filepath.Join(dir, "cut.img")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", good)
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", cut)
	if err := os.Truncate(cut, luks2.DataOffset); err != nil {
		t.Fatal(err)
	}
	var list []node.DriveStatus
	if err := json.Unmarshal([]byte(ksMust(t, bin, ks, "drive", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || !list[0].Present || list[0].Detail != "" || list[1].Present || list[1].State != node.DriveDamaged || !strings.Contains(list[1].Detail, "bad encrypted region") {
		t.Fatalf("drive list: %+v", list)
	}
	if st := ksStatus(t, bin, ks); st.Drives[1].State != node.DriveDamaged {
		t.Fatalf("status of the truncated drive: %+v", st.Drives[1])
	}
	ksWant(t, ksRun(t, bin, ks, nil, "serve", "--listen", "unix:"+filepath.Join(dir, "s.sock"), cut), exitcodes.Header, "no whole 4096-byte sector")
}
