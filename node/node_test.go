package node_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/node/nodetest"
)

// TestAddDriveWhileServing: a node that serves no volume yet starts; a drive added
// through it is exported at once under its volume's name, and reads back what was
// written through the export; the status calls it present and the volume ok.
func TestAddDriveWhileServing(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	sock := nodetest.Serve(t, n)
	if got := n.Exports(); len(got) != 0 {
		t.Fatalf("exports before any drive: %q", got)
	}
	img := filepath.Join(dir, "a.img")
	res, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img, Volume: "data", Create: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Exported || res.Drive.State != node.DrivePresent || res.Drive.Volume != "data" || res.Drive.Path != img {
		t.Fatalf("AddDrive: %+v", res)
	}
	if got := n.Exports(); !slices.Equal(got, []string{"data"}) {
		t.Fatalf("exports: %q, want [data]", got)
	}
	c, err := nbd.Dial(ctx, "unix:"+sock, nbd.ClientOptions{Export: "data", Connections: 1, ReconnectTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	want := []byte("written through the node's export")
	if _, err := c.WriteAt(want, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 4096); err != nil || string(got) != string(want) {
		t.Fatalf("read back %q, %v", got, err)
	}
	c.Close()

	st, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Serving || len(st.Volumes) != 1 || st.Volumes[0].State != node.VolumeOK || !slices.Equal(st.Volumes[0].Exports, []string{"data"}) || st.Volumes[0].Size != 32<<20-16<<20 {
		t.Fatalf("status volumes: %+v", st.Volumes)
	}
	if len(st.Drives) != 1 || !st.Drives[0].Present || st.Drives[0].Since == nil {
		t.Fatalf("status drives: %+v", st.Drives)
	}
	// The drive is held: formatting it again is refused, and changes nothing.
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img, Force: true}); !errors.Is(err, node.ErrConflict) && ErrorCodeOf(err) != "in-use" {
		t.Fatalf("format of a served drive: %v", err)
	}
}

// ErrorCodeOf is node.ErrorCode's code alone.
func ErrorCodeOf(err error) string { c, _ := node.ErrorCode(err); return c }

// TestAddDriveRefusals: malformed requests change nothing: no image is left behind and
// the registry stays empty.
func TestAddDriveRefusals(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	for _, req := range []node.AddDriveRequest{
		{Path: "relative.img", Create: 32 << 20},
		{Path: filepath.Join(dir, "a.img"), Create: 32 << 20, Volume: "a/b"},
		{Path: filepath.Join(dir, "a.img"), Create: 32 << 20, Volume: "bad\nname"},
		{Path: filepath.Join(dir, "a.img"), Create: 32 << 20, SectorSize: 1024},
		{Path: filepath.Join(dir, "a.img"), Create: 4096},
		{Path: dir},
		{Path: "/dev/null"},
	} {
		_, err := n.AddDrive(ctx, req)
		if code := ErrorCodeOf(err); code != "invalid" {
			t.Errorf("AddDrive(%+v): %v (code %s), want invalid", req, err, code)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "a.img")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused request left its image: %v", err)
	}
	img := filepath.Join(dir, "b.img")
	if err := os.WriteFile(img, make([]byte, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img}); !errors.Is(err, node.ErrHoldsData) || ErrorCodeOf(err) != "holds-data" {
		t.Errorf("format over a LUKS2 drive without force: %v", err)
	}
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: filepath.Join(dir, "c.img"), Create: 32 << 20, Volume: "vol0"}); !errors.Is(err, node.ErrConflict) && ErrorCodeOf(err) != "exists" {
		t.Errorf("a second volume vol0: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "c.img")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused format left its image: %v", err)
	}
	vols, err := n.Volumes(ctx)
	if err != nil || len(vols) != 1 || vols[0].Name != "vol0" {
		t.Fatalf("volumes: %+v, %v", vols, err)
	}
}

// TestRotateWhileServing: a rotation under a serving node rewraps the served drive,
// records the new key in the registry, and the export keeps answering.
func TestRotateWhileServing(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: filepath.Join(dir, "a.img"), Create: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	sock := nodetest.Serve(t, n)
	if got := n.Exports(); !slices.Equal(got, []string{"", "vol0"}) {
		t.Fatalf("exports: %q", got)
	}
	events := n.Subscribe(t.Context())
	before, _ := n.EncryptionStatus(ctx)
	res, err := n.Rotate(ctx, node.RotateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	es, _ := n.EncryptionStatus(ctx)
	if before.LastKeyRotationTime != nil || es.LastKeyRotationTime == nil || !es.LastKeyRotationTime.Equal(res.LastKeyRotationTime) || es.Status != "Encrypted" || es.Type != "Local" {
		t.Fatalf("encryption status %+v after rotation %+v", es, res)
	}
	ds, err := n.Drives(ctx)
	if err != nil || len(ds) != 1 || ds[0].KeyID != res.MasterKeyID || ds[0].State != node.DrivePresent {
		t.Fatalf("drives after rotation: %+v, %v", ds, err)
	}
	var types []string
	for e := range events {
		types = append(types, e.Type)
		if e.Type == node.EventRotationFinished {
			break
		}
	}
	if types[0] != node.EventRotationStarted {
		t.Errorf("events: %q", types)
	}
	c, err := nbd.Dial(ctx, "unix:"+sock, nbd.ClientOptions{Export: "vol0", Connections: 1, ReconnectTimeout: -1, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

// TestRemoveVolumeWhileServing: a served volume with a client is refused unless forced;
// without one it is unexported, its drive let go (it can be formatted again) and it
// leaves the registry; the other volume is served on.
func TestRemoveVolumeWhileServing(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	for _, p := range []string{a, b} {
		if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: p, Create: 32 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	sock := nodetest.Serve(t, n)
	c, err := nbd.Dial(ctx, "unix:"+sock, nbd.ClientOptions{Export: "vol0", Connections: 1, ReconnectTimeout: -1, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "vol0"}); !errors.Is(err, node.ErrConflict) {
		t.Fatalf("remove a volume with a client: %v", err)
	}
	c.Close()
	if _, err := n.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "nope"}); !errors.Is(err, node.ErrNotFound) {
		t.Fatalf("remove no volume: %v", err)
	}
	if _, err := n.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "../x"}); !errors.Is(err, node.ErrInvalid) {
		t.Fatalf("remove a bad name: %v", err)
	}
	var removed *node.VolumeStatus
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		// The server counts the connection until it has seen it close.
		if removed, err = n.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "vol0"}); !errors.Is(err, node.ErrConflict) || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || removed.Name != "vol0" {
		t.Fatalf("remove vol0: %+v, %v", removed, err)
	}
	if got := n.Exports(); !slices.Equal(got, []string{"vol1"}) {
		t.Fatalf("exports after the removal: %q", got)
	}
	vols, err := n.Volumes(ctx)
	if err != nil || len(vols) != 1 || vols[0].Name != "vol1" {
		t.Fatalf("volumes after the removal: %+v, %v", vols, err)
	}
	// Let go: the drive can be formatted again, as a new volume.
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: a, Force: true, Volume: "again"}); err != nil {
		t.Fatalf("format the removed volume's drive: %v", err)
	}
	if got := n.Exports(); !slices.Equal(got, []string{"again", "vol1"}) {
		t.Fatalf("exports: %q", got)
	}
}

// TestRemoveVolumeForced: a volume removed with Force while a client is connected is
// gone at once: the client's next read fails, its export is no longer offered, and the
// drive is let go (it can be formatted again).
func TestRemoveVolumeForced(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	img := filepath.Join(dir, "a.img")
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img, Create: 32 << 20, Volume: "held"}); err != nil {
		t.Fatal(err)
	}
	sock := nodetest.Serve(t, n)
	c, err := nbd.Dial(ctx, "unix:"+sock, nbd.ClientOptions{Export: "held", Connections: 1, ReconnectTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteAt([]byte("before the removal"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := n.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "held", Force: true}); err != nil {
		t.Fatalf("forced removal with a client connected: %v", err)
	}
	if _, err := c.ReadAt(make([]byte, 4096), 0); err == nil {
		t.Error("the client of a removed volume still reads")
	}
	if got := n.Exports(); len(got) != 0 {
		t.Errorf("exports after the removal: %q", got)
	}
	if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img, Force: true}); err != nil {
		t.Errorf("format the removed volume's drive: %v", err)
	}
}

// TestAdoptKeyFileRefusals: an adoption's key file that is empty, larger than a key
// file can be, or not an absolute path is refused before anything is locked, and the
// drive is not touched.
func TestAdoptKeyFileRefusals(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	img := filepath.Join(dir, "a.img")
	if err := os.WriteFile(img, make([]byte, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	empty, big := filepath.Join(dir, "empty.key"), filepath.Join(dir, "big.key")
	os.WriteFile(empty, nil, 0o600)
	os.WriteFile(big, make([]byte, 8<<10+1), 0o600)
	for _, key := range []string{empty, big, "relative.key"} {
		if _, err := n.AddDrive(ctx, node.AddDriveRequest{Path: img, AdoptKeyFile: key}); !errors.Is(err, node.ErrInvalid) {
			t.Errorf("adopt with key file %s: %v, want invalid", key, err)
		}
	}
	if vols, err := n.Volumes(ctx); err != nil || len(vols) != 0 {
		t.Errorf("volumes after refused adoptions: %+v, %v", vols, err)
	}
}
