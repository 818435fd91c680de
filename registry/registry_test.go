package registry

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/securefile"
)

const (
	cluster = "108cfeaf-8048-4dfc-a67c-e3dd42f8650b"
	keyA    = "mk-6618f37cb19128d2"
	keyB    = "mk-0123456789abcdef"
)

var t0 = time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)

func drive(id, path string) Drive {
	return Drive{UUID: id, KeyID: keyA, Path: path, SectorSize: 4096, State: DriveActive, Added: t0}
}

// sample is a registry with two single volumes and a two-way mirror.
func sample(t *testing.T) *Registry {
	t.Helper()
	r := New(cluster)
	must(t, r.AddVolume(Volume{UUID: "11111111-1111-4111-8111-111111111111", Name: "data0", Layout: LayoutSingle, Created: t0},
		[]Drive{drive("aaaaaaaa-0000-4000-8000-000000000001", "/dev/disk/by-id/a")}))
	must(t, r.AddVolume(Volume{UUID: "22222222-2222-4222-8222-222222222222", Name: "data1", Layout: LayoutSingle, Created: t0},
		[]Drive{drive("aaaaaaab-0000-4000-8000-000000000002", "/srv/img/b.img")}))
	must(t, r.AddVolume(Volume{UUID: "33333333-3333-4333-8333-333333333333", Name: "m", Layout: LayoutMirror, Created: t0},
		[]Drive{drive("cccccccc-0000-4000-8000-000000000003", "/dev/c"), drive("dddddddd-0000-4000-8000-000000000004", "/dev/d")}))
	return r
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestRoundTrip(t *testing.T) {
	r := sample(t)
	got, err := Parse(r.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if string(got.Marshal()) != string(r.Marshal()) {
		t.Fatalf("round trip changed the registry:\n%s\n%s", got.Marshal(), r.Marshal())
	}
	if v := got.Volume("m"); v == nil || len(v.Members) != 2 || v.Generation != 1 {
		t.Fatalf("mirror volume: %+v", v)
	}
	if d := got.Drive("dddddddd-0000-4000-8000-000000000004"); d.MemberIndex != 1 || d.VolumeUUID != "33333333-3333-4333-8333-333333333333" {
		t.Fatalf("second mirror member: %+v", d)
	}
}

// TestParseRefuses breaks one rule at a time in the JSON of a valid registry.
func TestParseRefuses(t *testing.T) {
	good := string(sample(t).Marshal())
	cases := map[string]struct{ old, new string }{
		"format":            {`"atrest-registry"`, `"atrest-keystore"`},
		"version":           {`"version": 1`, `"version": 2`},
		"unknown field":     {`"format"`, `"extra": 1, "format"`},
		"cluster uuid":      {cluster, "not-a-uuid"},
		"relative path":     {`"/srv/img/b.img"`, `"img/b.img"`},
		"unclean path":      {`"/srv/img/b.img"`, `"/srv/../srv/img/b.img"`},
		"sector size":       {`"sector_size": 4096`, `"sector_size": 1024`},
		"state":             {`"state": "active"`, `"state": "locked-to-old-key"`},
		"key id":            {keyA, "mk-xyz"},
		"layout":            {`"layout": "mirror"`, `"layout": "raid5"`},
		"volume name":       {`"name": "data0"`, `"name": "a/b"`},
		"duplicate name":    {`"name": "data1"`, `"name": "data0"`},
		"generation 0":      {`"generation": 1`, `"generation": 0`},
		"unknown member":    {`"aaaaaaaa-0000-4000-8000-000000000001"` + "\n      ]", `"aaaaaaaa-0000-4000-8000-00000000000f"` + "\n      ]"},
		"wrong member idx":  {`"member_index": 1`, `"member_index": 0`},
		"single two drives": {`"layout": "mirror"`, `"layout": "single"`},
		"trailing data":     {"}\n", "}\n{}"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if !strings.Contains(good, c.old) {
				t.Fatalf("the sample has no %q", c.old)
			}
			bad := strings.Replace(good, c.old, c.new, 1)
			if _, err := Parse([]byte(bad)); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Parse accepted a registry with a bad %s (err %v)", name, err)
			}
		})
	}
}

func TestFindDrive(t *testing.T) {
	r := sample(t)
	for _, c := range []struct {
		name, want string
		err        error
	}{
		{"aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000001", nil},
		{"cccccccc", "cccccccc-0000-4000-8000-000000000003", nil},
		{"CCCCCCCC-0", "cccccccc-0000-4000-8000-000000000003", nil},
		{"aaaaaaa", "", ErrNotFound},  // shorter than MinPrefix
		{"aaaaaaaa", "", nil},         // unique: 8 a's then '-'
		{"aaaaaaa", "", ErrNotFound},  // 7 characters
		{"eeeeeeee", "", ErrNotFound}, // no such drive
		{"/srv/img/b.img", "aaaaaaab-0000-4000-8000-000000000002", nil},
		{"/srv/img/../img/b.img", "aaaaaaab-0000-4000-8000-000000000002", nil},
		{"/srv/img/c.img", "", ErrNotFound},
		{"", "", ErrNotFound},
	} {
		d, err := r.FindDrive(c.name)
		if c.err != nil {
			if !errors.Is(err, c.err) {
				t.Errorf("FindDrive(%q) = %v, %v; want %v", c.name, d, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("FindDrive(%q): %v", c.name, err)
			continue
		}
		if c.want != "" && d.UUID != c.want {
			t.Errorf("FindDrive(%q) = %s, want %s", c.name, d.UUID, c.want)
		}
	}
	// "aaaaaaa" plus one more character is still ambiguous between the first two
	// drives only if both start that way: aaaaaaaa vs aaaaaaab.
	if _, err := r.FindDrive("aaaaaaa-"); !errors.Is(err, ErrNotFound) {
		t.Errorf("FindDrive(aaaaaaa-): %v", err)
	}
	r2 := sample(t)
	must(t, r2.AddVolume(Volume{UUID: "44444444-4444-4444-8444-444444444444", Name: "x", Layout: LayoutSingle, Created: t0},
		[]Drive{drive("cccccccc-1111-4000-8000-000000000005", "/dev/e")}))
	if _, err := r2.FindDrive("cccccccc"); !errors.Is(err, ErrAmbiguous) {
		t.Errorf("FindDrive of a prefix of two drives: %v, want ErrAmbiguous", err)
	}
}

func TestChanges(t *testing.T) {
	r := sample(t)
	before := string(r.Marshal())
	// Refused changes leave the registry as it was.
	if err := r.AddVolume(Volume{UUID: "55555555-5555-4555-8555-555555555555", Name: "data0", Layout: LayoutSingle, Created: t0},
		[]Drive{drive("eeeeeeee-0000-4000-8000-000000000005", "/dev/e")}); !errors.Is(err, ErrExists) {
		t.Fatalf("AddVolume of a taken name: %v", err)
	}
	if err := r.AddVolume(Volume{UUID: "55555555-5555-4555-8555-555555555555", Name: "new", Layout: LayoutSingle, Created: t0},
		[]Drive{drive("eeeeeeee-0000-4000-8000-000000000005", "relative/path")}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("AddVolume with a relative path: %v", err)
	}
	if err := r.AddVolume(Volume{UUID: "55555555-5555-4555-8555-555555555555", Name: "new", Layout: LayoutSingle, Created: t0},
		[]Drive{drive("eeeeeeee-0000-4000-8000-000000000005", "/dev/e"), drive("ffffffff-0000-4000-8000-000000000006", "/dev/f")}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("AddVolume single with two drives: %v", err)
	}
	if got := string(r.Marshal()); got != before {
		t.Fatalf("a refused change changed the registry")
	}

	must(t, r.SeenAt("aaaaaaaa-0000-4000-8000-000000000001", "/dev/sdf", t0.Add(time.Hour)))
	if d := r.Drive("aaaaaaaa-0000-4000-8000-000000000001"); d.Path != "/dev/sdf" || !d.LastSeen.Equal(t0.Add(time.Hour)) {
		t.Fatalf("SeenAt: %+v", d)
	}
	must(t, r.MarkStale("cccccccc-0000-4000-8000-000000000003"))
	if v := r.Volume("m"); v.Generation != 2 {
		t.Fatalf("MarkStale did not bump the generation: %d", v.Generation)
	}
	nd := drive("eeeeeeee-0000-4000-8000-000000000005", "/dev/sdg")
	must(t, r.ReplaceMember("cccccccc-0000-4000-8000-000000000003", nd))
	v := r.Volume("m")
	if v.Members[0] != nd.UUID || v.Generation != 3 || r.Drive("cccccccc-0000-4000-8000-000000000003") != nil {
		t.Fatalf("ReplaceMember: %+v", v)
	}
	if d := r.Drive(nd.UUID); d.MemberIndex != 0 || d.VolumeUUID != v.UUID {
		t.Fatalf("replacement: %+v", d)
	}
	must(t, r.SetKeyID(nd.UUID, keyB))
	if _, err := Parse(r.Marshal()); err != nil {
		t.Fatal(err)
	}
	if err := r.RemoveVolume("44444444-4444-4444-8444-444444444444"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RemoveVolume of no volume: %v", err)
	}
	must(t, r.RemoveVolume(v.UUID))
	if r.Volume("m") != nil || r.Drive(nd.UUID) != nil || r.Drive("dddddddd-0000-4000-8000-000000000004") != nil || len(r.Volumes) != 2 || len(r.Drives) != 2 {
		t.Fatalf("RemoveVolume left %s", r.Marshal())
	}
	if _, err := Parse(r.Marshal()); err != nil {
		t.Fatal(err)
	}
}

func newStoreDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ks")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestFileStore(t *testing.T) {
	ctx := context.Background()
	dir := newStoreDir(t)
	s := NewFileStore(dir)
	if _, err := s.Load(ctx); !errors.Is(err, ErrNoRegistry) {
		t.Fatalf("Load of an empty store: %v", err)
	}
	tx, err := s.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Commit of a registry of no cluster: %v", err)
	}
	tx.Reset(sample(t))
	// The lock is held: a second Begin is refused, loads are not.
	if _, err := s.Begin(ctx); !errors.Is(err, securefile.ErrBusy) {
		t.Fatalf("second Begin: %v", err)
	}
	must(t, tx.Commit())
	must(t, tx.Registry().SeenAt("aaaaaaaa-0000-4000-8000-000000000001", "/dev/sdz", t0))
	// Not committed: the store keeps the first commit.
	must(t, tx.Close())
	got, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := got.Drive("aaaaaaaa-0000-4000-8000-000000000001"); d.Path != "/dev/disk/by-id/a" {
		t.Fatalf("an uncommitted change was stored: %+v", d)
	}
	st, err := os.Stat(s.Location())
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("registry.json: %v, mode %v", err, st.Mode())
	}
	tx2, err := s.Begin(ctx)
	if err != nil {
		t.Fatalf("Begin after Close: %v", err)
	}
	tx2.Close()

	// A registry.json open to others is refused, not read.
	must(t, os.Chmod(s.Location(), 0o644))
	if _, err := s.Load(ctx); !errors.Is(err, securefile.ErrUnsafe) {
		t.Fatalf("Load of a 0644 registry.json: %v", err)
	}
	must(t, os.Chmod(s.Location(), 0o600))
	// A damaged one is an error, and Begin does not overwrite it.
	must(t, os.WriteFile(s.Location(), []byte(`{"format": "atrest-registry", "version": 1, "cluster_uuid": `), 0o600))
	if _, err := s.Begin(ctx); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Begin on a damaged registry.json: %v", err)
	}
}

// TestCommitCrash stops a commit between the durable temporary file and the rename:
// the store still holds the old registry, complete.
func TestCommitCrash(t *testing.T) {
	ctx := context.Background()
	s := NewFileStore(newStoreDir(t))
	tx, err := s.Begin(ctx)
	must(t, err)
	tx.Reset(sample(t))
	must(t, tx.Commit())
	must(t, tx.Registry().MarkStale("cccccccc-0000-4000-8000-000000000003"))
	errCrash := errors.New("crash")
	securefile.TestHookBeforeRename = func(string, string) { panic(errCrash) }
	func() {
		defer func() {
			if r := recover(); r != errCrash {
				panic(r)
			}
		}()
		tx.Commit()
	}()
	securefile.TestHookBeforeRename = nil
	tx.Close()
	got, err := s.Load(ctx)
	must(t, err)
	if got.Drive("cccccccc-0000-4000-8000-000000000003").State != DriveActive {
		t.Fatal("a commit that crashed before its rename is visible")
	}
}

func FuzzParse(f *testing.F) {
	f.Add(New(cluster).Marshal())
	r := New(cluster)
	_ = r.AddVolume(Volume{UUID: "11111111-1111-4111-8111-111111111111", Name: "data0", Layout: LayoutMirror, Created: t0},
		[]Drive{drive("aaaaaaaa-0000-4000-8000-000000000001", "/dev/a"), drive("bbbbbbbb-0000-4000-8000-000000000002", "/dev/b")})
	f.Add(r.Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Parse(b)
		if err != nil {
			return
		}
		again, err := Parse(r.Marshal())
		if err != nil {
			t.Fatalf("a registry that parsed does not parse after Marshal: %v", err)
		}
		if string(again.Marshal()) != string(r.Marshal()) {
			t.Fatal("Marshal is not stable")
		}
	})
}
