package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/luks2/luks2test"
	"github.com/atrest/atrest/node"
)

// ksBuild builds the atrest binary into the test's temporary directory.
func ksBuild(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "atrest")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

type ksResult struct {
	stdout, stderr string
	code           int
	signal         syscall.Signal
}

// ksRun runs the binary with the keystore in ATREST_KEYSTORE and extra env.
func ksRun(t testing.TB, bin, ks string, env []string, args ...string) ksResult {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(append(os.Environ(), keystore.EnvDir+"="+ks), env...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	r := ksResult{stdout: so.String(), stderr: se.String()}
	var other error
	if r.code, r.signal, other = testutil.ExitStatus(err); other != nil {
		t.Fatal(other)
	}
	return r
}

// ksUnlock opens a drive as the daemon does, with a fresh snapshot of the keystore.
func ksUnlock(t testing.TB, ks, path string, readOnly bool) (*drive.Unlocked, error) {
	t.Helper()
	k, err := keystore.Open(ks)
	if err != nil {
		t.Fatal(err)
	}
	return drive.Unlock(path, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys, ReadOnly: readOnly})
}

func ksMust(t testing.TB, bin, ks string, args ...string) string {
	t.Helper()
	r := ksRun(t, bin, ks, nil, args...)
	if r.code != 0 {
		t.Fatalf("atrest %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

func ksWant(t testing.TB, r ksResult, code int, inStderr string) {
	t.Helper()
	if r.code != code || !strings.Contains(r.stderr, inStderr) {
		t.Fatalf("exit %d (want %d), stderr %q (want %q)", r.code, code, r.stderr, inStderr)
	}
}

func ksStatus(t testing.TB, bin, ks string) node.Status {
	t.Helper()
	var st node.Status
	if err := json.Unmarshal([]byte(ksMust(t, bin, ks, "encryption-status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestInitRerun: the binary's init, rerun where an earlier one stopped after writing
// master.key (keystore.json removed here to make that state), finishes with that key.
func TestInitRerun(t *testing.T) {
	bin := ksBuild(t)
	ks := filepath.Join(t.TempDir(), "keystore")
	ksMust(t, bin, ks, "init")
	key, err := os.ReadFile(filepath.Join(ks, keystore.MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(ks, keystore.StateFile)); err != nil {
		t.Fatal(err)
	}
	out := ksMust(t, bin, ks, "init")
	if !strings.Contains(out, "Finished an interrupted init") {
		t.Fatalf("rerun of init: %s", out)
	}
	if again, _ := os.ReadFile(filepath.Join(ks, keystore.MasterKeyFile)); !bytes.Equal(again, key) {
		t.Fatal("the rerun replaced master.key")
	}
	ksMust(t, bin, ks, "encryption-status")
}

// TestKeystoreCommands runs the commands end to end as an administrator would.
func TestKeystoreCommands(t *testing.T) {
	luks2test.Cryptsetup(t)
	bin := ksBuild(t)
	dir := t.TempDir()
	ks := filepath.Join(dir, "keystore")

	out := ksMust(t, bin, ks, "init")
	if !strings.Contains(out, "Cluster UUID: ") || !strings.Contains(out, "master.key") {
		t.Fatalf("init: %s", out)
	}
	ksWant(t, ksRun(t, bin, ks, nil, "init"), exitcodes.Exists, "keystore already exists")

	d1, d2 := filepath.Join(dir, "d1.img"), filepath.Join(dir, "d2.img")
	out = ksMust(t, bin, ks, "drive", "format", "--create", "64M", d1)
	if !strings.Contains(out, "volume vol0, sector size 4096") {
		t.Fatalf("format: %s", out)
	}
	if fi, _ := os.Stat(d1); fi.Size() != 64<<20 {
		t.Fatalf("--create made %d bytes", fi.Size())
	}
	ksMust(t, bin, ks, "drive", "format", "--create", "40MiB", "--volume", "db", "--sector-size", "512", "--allow-discards", d2)
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", d1), exitcodes.Exists, "holds a LUKS header")
	// --wipe: the data area reads zeroes through atrest and is noise on the drive.
	dw := filepath.Join(dir, "wiped.img")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", "--wipe", "--volume", "wiped", dw)
	{
		u, err := ksUnlock(t, ks, dw, true)
		if err != nil {
			t.Fatal(err)
		}
		plain := make([]byte, u.Device.Size())
		_, err = u.Device.ReadAt(plain, 0)
		u.Device.Close()
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := os.ReadFile(dw)
		if !bytes.Equal(plain, make([]byte, len(plain))) || bytes.Count(raw[luks2.DataOffset:], []byte{0}) > len(plain)/100 {
			t.Fatal("--wipe did not fill the data area with encrypted zeroes")
		}
		// Reformatting it (forced) replaces its registry entry.
		ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", "--volume", "wiped", dw), exitcodes.Exists, "holds a LUKS header")
		ksMust(t, bin, ks, "drive", "format", "--force", "--volume", "wiped", dw)
	}
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", "--create", "1G", d1), exitcodes.Exists, "file exists")
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", "--sector-size", "1024", d1), exitcodes.Usage, "--sector-size 1024")
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", "--create", "12Q", d1), exitcodes.Usage, "size")
	ext := filepath.Join(dir, "ext4.img")
	if out, err := exec.Command("mkfs.ext4", "-q", ext, "20M").CombinedOutput(); err == nil {
		ksWant(t, ksRun(t, bin, ks, nil, "drive", "format", ext), exitcodes.Exists, "ext2/3/4 file system")
	} else if luks2test.InCryptsetup(t) {
		t.Logf("mkfs.ext4 unavailable (%v: %s); ext4 detection not checked", err, out)
	}

	var list []node.DriveStatus
	if err := json.Unmarshal([]byte(ksMust(t, bin, ks, "drive", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[1].Volume != "db" || list[1].SectorSize != 512 || !list[0].Present || list[0].Path != d1 {
		t.Fatalf("list: %+v", list)
	}
	if out := ksMust(t, bin, ks, "drive", "list"); !strings.Contains(out, "vol0") || !strings.Contains(out, "STATE") {
		t.Fatalf("list: %s", out)
	}

	st := ksStatus(t, bin, ks)
	if !st.DataEncrypted || st.Type != "software" || st.Cipher != "AES-256-XTS" || st.LastRotation != nil || st.RotationUnderWay || len(st.Drives) != 3 {
		t.Fatalf("status: %+v", st)
	}
	for _, d := range st.Drives {
		if d.State != node.DrivePresent || d.KeyID != st.MasterKeyID {
			t.Fatalf("status drive %+v", d)
		}
	}
	text := ksMust(t, bin, ks, "encryption_status")
	for _, want := range []string{"Data Encrypted:           yes", "software, AES-256-XTS", "Last Key Rotation:        never", "Key Rotation In Progress: no", st.MasterKeyID} {
		if !strings.Contains(text, want) {
			t.Errorf("status lacks %q:\n%s", want, text)
		}
	}

	// Adopt a drive cryptsetup formatted; a wrong key file is refused first.
	d3 := luks2test.SparseImage(t, 32<<20)
	oldKey := luks2test.KeyFile(t, []byte("an old passphrase of an admin"))
	luks2test.Format(t, d3, oldKey, luks2test.FastPBKDF2...)
	wrong := luks2test.KeyFile(t, []byte("not it"))
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "adopt", "--key-file", wrong, d3), exitcodes.Key, "no keyslot opens")
	out = ksMust(t, bin, ks, "drive", "adopt", "--key-file", oldKey, "--volume", "legacy", d3)
	if !strings.Contains(out, "Adopted "+d3) || !strings.Contains(out, "Wiped keyslot 0") {
		t.Fatalf("adopt: %s", out)
	}
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "adopt", "--key-file", oldKey, d3), exitcodes.Exists, "already registered")

	// Rotate; cryptsetup follows.
	before := st.MasterKeyID
	oldMaster, _ := os.ReadFile(filepath.Join(ks, keystore.MasterKeyFile))
	out = ksMust(t, bin, ks, "rotate-encryption-keys")
	if !strings.HasSuffix(out, "Key rotation complete\n") {
		t.Fatalf("rotate: %q", out)
	}
	st = ksStatus(t, bin, ks)
	if st.MasterKeyID == before || st.LastRotation == nil || time.Since(*st.LastRotation) > time.Minute || st.LastRotation.Location() != time.UTC {
		t.Fatalf("after rotation: %+v", st)
	}
	if text := ksMust(t, bin, ks, "encryption-status"); !strings.Contains(text, "Last Key Rotation:        "+st.LastRotation.Format(time.RFC3339)) {
		t.Fatalf("status text: %s", text)
	}
	oldFile := luks2test.KeyFile(t, oldMaster)
	for _, p := range []string{d1, d2, d3} {
		if ok, out := luks2test.Opens(t, p, filepath.Join(ks, keystore.MasterKeyFile)); !ok {
			t.Fatalf("%s: cryptsetup refuses the new master key: %s", p, out)
		}
		if ok, _ := luks2test.Opens(t, p, oldFile); ok {
			t.Fatalf("%s: cryptsetup opens with the old master key", p)
		}
	}
	ksMust(t, bin, ks, "rotate_encryption_keys")

	// A pulled drive: refused, then --force.
	os.Rename(d2, d2+".pulled")
	ksWant(t, ksRun(t, bin, ks, nil, "rotate-encryption-keys"), exitcodes.DriveMissing, "missing")
	out = ksMust(t, bin, ks, "rotate-encryption-keys", "--force")
	if !strings.Contains(out, "is stale: locked to old key") || !strings.HasSuffix(out, "Key rotation complete\n") {
		t.Fatalf("forced rotation: %s", out)
	}
	st = ksStatus(t, bin, ks)
	if st.Drives[1].State != node.DriveStale || st.Drives[1].KeyID == st.MasterKeyID {
		t.Fatalf("pulled drive: %+v", st.Drives[1])
	}

	// Unsafe keystores exit 3.
	os.Chmod(filepath.Join(ks, keystore.MasterKeyFile), 0o644)
	ksWant(t, ksRun(t, bin, ks, nil, "encryption-status"), exitcodes.Keystore, "chmod 0600")
	ksWant(t, ksRun(t, bin, ks, nil, "rotate-encryption-keys"), exitcodes.Keystore, "grants access to group or others")
	ksWant(t, ksRun(t, bin, filepath.Join(dir, "none"), nil, "drive", "list"), exitcodes.Keystore, "no keystore")
}

// TestRotateSurvivesSIGKILL kills the real binary with SIGKILL at every step boundary
// of a rotation, then at random moments; after each kill every drive opens with a
// key the journal names, a rerun completes the rotation, every drive opens with the
// new master key, its data is unchanged, and the old master key opens nothing.
func TestRotateSurvivesSIGKILL(t *testing.T) {
	bin := ksBuild(t)
	dir := t.TempDir()
	ks := filepath.Join(dir, "keystore")
	ksMust(t, bin, ks, "init")
	var paths []string
	for i := range 3 {
		p := filepath.Join(dir, fmt.Sprintf("d%d.img", i))
		ksMust(t, bin, ks, "drive", "format", "--create", "24M", "--sector-size", []string{"4096", "512", "4096"}[i], p)
		paths = append(paths, p)
	}
	data := make([][]byte, len(paths))
	for i, p := range paths {
		data[i] = make([]byte, 20000)
		rand.Read(data[i])
		u, err := ksUnlock(t, ks, p, false)
		if err != nil {
			t.Fatal(err)
		}
		u.Device.WriteAt(data[i], 777)
		u.Device.Close()
	}
	cs := luks2test.InCryptsetup(t)

	check := func(when string, oldMaster []byte) {
		t.Helper()
		if _, err := keystore.Open(ks); err != nil {
			t.Fatalf("%s: keystore: %v", when, err)
		}
		for i, p := range paths {
			u, err := ksUnlock(t, ks, p, true)
			if err != nil {
				t.Fatalf("%s: drive %d: %v", when, i, err)
			}
			got := make([]byte, len(data[i]))
			u.Device.ReadAt(got, 777)
			u.Device.Close()
			if !bytes.Equal(got, data[i]) {
				t.Fatalf("%s: drive %d: data changed", when, i)
			}
			if oldMaster == nil {
				continue
			}
			dev, err := luks2test.OpenReadOnly(p)
			if err != nil {
				t.Fatal(err)
			}
			h, err := luks2.Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = h.Unlock(dev, oldMaster)
			dev.Close()
			if !errors.Is(err, luks2.ErrWrongKey) {
				t.Fatalf("%s: drive %d: the old master key: %v", when, i, err)
			}
			if cs {
				if ok, out := luks2test.Opens(t, p, filepath.Join(ks, keystore.MasterKeyFile)); !ok {
					t.Fatalf("%s: drive %d: cryptsetup refuses master.key: %s", when, i, out)
				}
			}
		}
	}
	master := func() []byte {
		b, err := os.ReadFile(filepath.Join(ks, keystore.MasterKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rerun := func(when string, old []byte) {
		t.Helper()
		r := ksRun(t, bin, ks, nil, "rotate-encryption-keys")
		if r.code != 0 || !strings.HasSuffix(r.stdout, "Key rotation complete\n") {
			t.Fatalf("%s: rerun: exit %d\n%s%s", when, r.code, r.stdout, r.stderr)
		}
		check(when+", after the rerun", old)
	}

	// Every step boundary: the N-th step, until a run passes them all.
	steps := 0
	for n := 1; ; n++ {
		old := master()
		r := ksRun(t, bin, ks, []string{crashEnv + "=" + fmt.Sprint(n)}, "rotate-encryption-keys")
		if r.signal != syscall.SIGKILL {
			if r.code != 0 || !strings.Contains(r.stdout, "Key rotation complete") {
				t.Fatalf("step %d: exit %d\n%s", n, r.code, r.stderr)
			}
			check("uninterrupted", old)
			steps = n - 1
			break
		}
		check(fmt.Sprintf("killed at step %d", n), nil)
		rerun(fmt.Sprintf("killed at step %d", n), old)
	}
	if steps < 2+5*len(paths)+3 {
		t.Fatalf("only %d steps", steps)
	}
	// A named point: the second drive's verification.
	old := master()
	r := ksRun(t, bin, ks, []string{crashEnv + "=drive-verified:2"}, "rotate-encryption-keys")
	if r.signal != syscall.SIGKILL {
		t.Fatalf("named crash point not reached: %+v", r)
	}
	k, _ := keystore.Open(ks)
	if j := k.State().Rotation; j == nil || j.Drives[0].State != keystore.RotDone || j.Drives[1].State != keystore.RotWiping || j.Drives[2].State != keystore.RotPending {
		t.Fatalf("journal after a kill at drive-verified:2: %+v", j)
	}
	if st := ksStatus(t, bin, ks); !st.RotationUnderWay || st.Rotation.DrivesDone != 1 || st.Drives[1].State != node.DriveRotating {
		t.Fatalf("status after the kill: %+v", st)
	}
	rerun("killed at drive-verified:2", old)
	// Random moments: measure a whole rotation, then kill within that time.
	start := time.Now()
	ksMust(t, bin, ks, "rotate-encryption-keys")
	whole := time.Since(start)
	kills := 0
	for i := range 25 {
		old := master()
		cmd := exec.Command(bin, "rotate-encryption-keys")
		cmd.Env = append(os.Environ(), keystore.EnvDir+"="+ks)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		d, _ := rand.Int(rand.Reader, big.NewInt(int64(whole)))
		time.Sleep(time.Duration(d.Int64()))
		cmd.Process.Signal(syscall.SIGKILL)
		err := cmd.Wait()
		if testutil.KilledBy(cmd.ProcessState) != 0 {
			kills++
		} else if err != nil {
			t.Fatalf("random %d: %v", i, err)
		}
		check(fmt.Sprintf("random kill %d after %v", i, time.Duration(d.Int64())), nil)
		rerun(fmt.Sprintf("random kill %d", i), old)
	}
	t.Logf("%d step boundaries; a rotation takes %v; %d of 25 random kills landed before the end", steps, whole, kills)
}

// TestUnlockDuringRotation: the daemon's Unlock, in this process, keeps opening every
// drive while the real binary rotates the master key again and again beside it.
func TestUnlockDuringRotation(t *testing.T) {
	bin := ksBuild(t)
	dir := t.TempDir()
	ks := filepath.Join(dir, "keystore")
	ksMust(t, bin, ks, "init")
	var paths []string
	for i := range 2 {
		p := filepath.Join(dir, fmt.Sprintf("d%d.img", i))
		ksMust(t, bin, ks, "drive", "format", "--create", "20M", p)
		paths = append(paths, p)
	}
	done := make(chan error)
	go func() {
		for range 8 {
			if r := ksRun(t, bin, ks, nil, "rotate-encryption-keys"); r.code != 0 {
				done <- fmt.Errorf("rotation: exit %d: %s", r.code, r.stderr)
				return
			}
		}
		done <- nil
	}()
	// On a failure here, the rotations still running are waited for before the test
	// ends (they use t and the temporary directory).
	unlocks := 0
	var failure error
	for failure == nil {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d unlocks during 8 rotations", unlocks)
			if unlocks < 8 {
				t.Fatalf("only %d unlocks ran beside the rotations", unlocks)
			}
			return
		default:
		}
		k, err := keystore.Open(ks)
		if err != nil {
			failure = fmt.Errorf("open during a rotation: %w", err)
			break
		}
		for _, p := range paths {
			u, err := drive.Unlock(p, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys, ReadOnly: true})
			if err != nil {
				failure = fmt.Errorf("unlock during a rotation: %w", err)
				break
			}
			u.Device.Close()
			unlocks++
		}
	}
	if err := <-done; err != nil {
		t.Error(err)
	}
	t.Fatal(failure)
}

// TestDamagedHeaders: a drive with one damaged header copy shows as degraded and the
// next rotation repairs it; a drive with both copies damaged makes the rotation
// refuse with exit code 4, and not a byte of it changes.
func TestDamagedHeaders(t *testing.T) {
	bin := ksBuild(t)
	dir := t.TempDir()
	ks := filepath.Join(dir, "keystore")
	ksMust(t, bin, ks, "init")
	d := filepath.Join(dir, "d.img")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", d)
	flip := func(off int64) {
		f, err := os.OpenFile(d, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, 1)
		f.ReadAt(b, off)
		b[0] ^= 0x20
		f.WriteAt(b, off)
	}
	flip(luks2.HeaderSize + 4096 + 2) // the secondary's JSON
	st := ksStatus(t, bin, ks)
	if st.Drives[0].State != node.DriveDegraded || !strings.Contains(st.Drives[0].Detail, "secondary header damaged") {
		t.Fatalf("one damaged copy: %+v", st.Drives[0])
	}
	ksMust(t, bin, ks, "rotate-encryption-keys")
	if st := ksStatus(t, bin, ks); st.Drives[0].State != node.DrivePresent {
		t.Fatalf("after the rotation: %+v", st.Drives[0])
	}
	flip(4096 + 2)
	flip(luks2.HeaderSize + 4096 + 2)
	before, _ := os.ReadFile(d)
	ksWant(t, ksRun(t, bin, ks, nil, "rotate-encryption-keys"), exitcodes.Header, "both LUKS2 header copies are damaged")
	if st := ksStatus(t, bin, ks); st.Drives[0].State != node.DriveDamaged {
		t.Fatalf("both damaged: %+v", st.Drives[0])
	}
	if after, _ := os.ReadFile(d); !bytes.Equal(before, after) {
		t.Fatal("a refused rotation changed the drive")
	}
}

// TestRotateProgressOnTerminal: on a terminal (script(1) gives the command a pty) the
// rotation prints its steps; elsewhere only the result (checked in the other tests).
func TestRotateProgressOnTerminal(t *testing.T) {
	script := testutil.Tool(t, "script")
	bin := ksBuild(t)
	dir := t.TempDir()
	ks := filepath.Join(dir, "keystore")
	ksMust(t, bin, ks, "init")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", filepath.Join(dir, "d.img"))
	cmd := exec.Command(script, "-q", "-e", "-c", bin+" rotate-encryption-keys", "/dev/null")
	cmd.Env = append(os.Environ(), keystore.EnvDir+"="+ks)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"New master key written", "drive 1/1", "new keyslot verified", "old keyslot wiped", "master.key replaced", "Key rotation complete"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("no %q in the terminal output:\n%s", want, out)
		}
	}
}
