package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/node/nodetest"
)

// socketDir is a directory for sockets with a short path (a unix socket's path is
// bounded to 107 bytes, which t.TempDir's can pass), mode 0755 so that another uid

// serveAPI serves svc's control API on a socket in a new socket directory; stopped at
// cleanup. It returns the socket's path and a client of it.
func serveAPI(t *testing.T, svc node.Service) (string, *Client) {
	t.Helper()
	sock := filepath.Join(nodetest.SocketDir(t), "control.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(svc, nil)
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	c, err := Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	})
	return sock, c
}

// rawClient is an http.Client of the socket at sock, for requests the Client does not
// make.
func rawClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
}

// call sends one request and returns the status, the headers and the body.
func call(t *testing.T, sock, method, path, ctype string, body []byte) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://x"+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body == nil {
		req.Body = nil
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	hc := rawClient(sock)
	defer hc.CloseIdleConnections()
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, b
}

// addDrive formats an image in dir as volume vol, offline.
func addDrive(t *testing.T, n *node.Node, dir, vol string) *node.AddDriveResult {
	t.Helper()
	res, err := n.AddDrive(context.Background(), node.AddDriveRequest{Path: filepath.Join(dir, vol+".img"), Volume: vol, Create: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestEndpoints: every endpoint answers through the Client what the node answers in
// process, and a rotation through the API shows in the encryption status.
func TestEndpoints(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	a := addDrive(t, n, dir, "alpha")
	addDrive(t, n, dir, "beta")
	_, c := serveAPI(t, n)

	id, err := c.Identity(ctx)
	if err != nil || id.Keystore != n.Dir() || id.Serving || id.Version != "test" || id.ClusterUUID == "" {
		t.Fatalf("identity: %+v, %v", id, err)
	}
	es, err := c.EncryptionStatus(ctx)
	if err != nil || es.Status != "Encrypted" || es.Type != "Local" || es.LastKeyRotationTime != nil {
		t.Fatalf("encryption status: %+v, %v", es, err)
	}
	want, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st.MasterKeyAge, want.MasterKeyAge = 0, 0
	if !sameJSON(t, st, want) {
		t.Errorf("status through the API:\n%+v\nin process:\n%+v", st, want)
	}
	ds, err := c.Drives(ctx)
	if err != nil || !sameJSON(t, ds, want.Drives) || len(ds) != 2 {
		t.Errorf("drives: %+v, %v", ds, err)
	}
	for _, name := range []string{a.Drive.UUID, a.Drive.UUID[:8], strings.ToUpper(a.Drive.UUID[:13]), a.Drive.Path} {
		d, err := c.Drive(ctx, name)
		if err != nil || d.UUID != a.Drive.UUID || d.Volume != "alpha" {
			t.Errorf("drive %q: %+v, %v", name, d, err)
		}
	}
	if _, err := c.Drive(ctx, "0123456789"); !errors.Is(err, node.ErrNotFound) {
		t.Errorf("an unknown drive: %v, want ErrNotFound", err)
	}
	if _, err := c.Drive(ctx, a.Drive.UUID[:7]); !errors.Is(err, node.ErrNotFound) {
		t.Errorf("a 7-character prefix: %v, want ErrNotFound", err)
	}
	vs, err := c.Volumes(ctx)
	if err != nil || !sameJSON(t, vs, want.Volumes) || len(vs) != 2 {
		t.Errorf("volumes: %+v, %v", vs, err)
	}
	v, err := c.Volume(ctx, "beta")
	if err != nil || v.Name != "beta" || v.State != node.VolumeOK {
		t.Errorf("volume beta: %+v, %v", v, err)
	}
	_, err = c.Volume(ctx, "gamma")
	var re *node.RemoteError
	if !errors.Is(err, node.ErrNotFound) || !errors.As(err, &re) || re.Code != "not-found" || err.Error() != `volume "gamma": not found` {
		t.Errorf("an unknown volume: %#v, want the node's ErrNotFound as a RemoteError", err)
	}

	res, err := c.Rotate(ctx, node.RotateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if res.MasterKeyID == want.MasterKeyID || res.StaleDrives == nil {
		t.Errorf("rotation: %+v", res)
	}
	es, err = c.EncryptionStatus(ctx)
	if err != nil || es.LastKeyRotationTime == nil || !es.LastKeyRotationTime.Equal(res.LastKeyRotationTime) {
		t.Fatalf("encryption status after the rotation %+v: %+v, %v", res, es, err)
	}
	ds, err = c.Drives(ctx)
	if err != nil || ds[0].KeyID != res.MasterKeyID || ds[1].KeyID != res.MasterKeyID {
		t.Errorf("drives after the rotation: %+v, %v", ds, err)
	}
}

// TestEncryptionStatusShape: the product's shape exactly: three keys, the time RFC 3339
// in UTC or null.
func TestEncryptionStatusShape(t *testing.T) {
	n, _ := nodetest.New(t)
	sock, c := serveAPI(t, n)
	for i := range 2 {
		status, h, body := call(t, sock, "GET", "/v1/encryption/status", "", nil)
		if status != 200 || h.Get("Content-Type") != "application/json" {
			t.Fatalf("status %d, %q", status, h.Get("Content-Type"))
		}
		var m map[string]any
		if err := json.Unmarshal(body, &m); err != nil {
			t.Fatal(err)
		}
		if len(m) != 3 || m["status"] != "Encrypted" || m["type"] != "Local" {
			t.Fatalf("shape: %s", body)
		}
		rt, ok := m["last_key_rotation_time"]
		if i == 0 && (!ok || rt != nil) {
			t.Fatalf("before any rotation: %s", body)
		}
		if i == 1 {
			s, _ := rt.(string)
			tm, err := time.Parse(time.RFC3339, s)
			if err != nil || !strings.HasSuffix(s, "Z") || tm.IsZero() {
				t.Fatalf("after a rotation: %s", body)
			}
			break
		}
		if _, err := c.Rotate(t.Context(), node.RotateRequest{}); err != nil {
			t.Fatal(err)
		}
	}
}

// sameJSON reports whether a and b marshal the same.
func sameJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(ja, jb)
}

// heldRotation is the node with a Rotate held after its first step until release is
// closed: a second rotation meets the first one running.
type heldRotation struct {
	*node.Node
	started chan struct{}
	release chan struct{}
	once    sync.Once
}

func (h *heldRotation) Rotate(ctx context.Context, req node.RotateRequest) (*node.RotateResult, error) {
	req.Step = func(keystore.Step) {
		h.once.Do(func() {
			close(h.started)
			<-h.release
		})
	}
	return h.Node.Rotate(ctx, req)
}

// TestRotateConflict: a rotation requested while one runs is refused with 409 and the
// code rotation-running, which the Client turns back into node.ErrRotationRunning; the
// first one finishes.
func TestRotateConflict(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	addDrive(t, n, dir, "alpha")
	h := &heldRotation{Node: n, started: make(chan struct{}), release: make(chan struct{})}
	sock, c := serveAPI(t, h)
	first := make(chan error, 1)
	var res *node.RotateResult
	go func() {
		var err error
		res, err = c.Rotate(ctx, node.RotateRequest{})
		first <- err
	}()
	select {
	case <-h.started:
	case err := <-first:
		t.Fatalf("the first rotation ended before its first step: %v", err)
	}
	status, _, body := call(t, sock, "POST", "/v1/encryption/rotate-keys", "application/json", []byte(`{"force": false}`))
	var e ErrorBody
	if err := json.Unmarshal(body, &e); status != http.StatusConflict || err != nil || e.Error.Code != "rotation-running" {
		t.Errorf("a second rotation: %d %s", status, body)
	}
	_, err := c.Rotate(ctx, node.RotateRequest{})
	if !errors.Is(err, node.ErrRotationRunning) {
		t.Errorf("a second rotation through the Client: %v, want ErrRotationRunning", err)
	}
	close(h.release)
	if err := <-first; err != nil {
		t.Fatalf("the first rotation: %v", err)
	}
	es, err := c.EncryptionStatus(ctx)
	if err != nil || es.LastKeyRotationTime == nil || !es.LastKeyRotationTime.Equal(res.LastKeyRotationTime) {
		t.Fatalf("encryption status: %+v, %v", es, err)
	}
}

// TestAddDriveWhileServing: a drive formatted through the API of a serving node is
// exported at once: nbdinfo lists it and a client reads it.
func TestAddDriveWhileServing(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	nbdSock := nodetest.Serve(t, n)
	sock, c := serveAPI(t, n)
	id, err := c.Identity(ctx)
	if err != nil || !id.Serving || id.PID != os.Getpid() {
		t.Fatalf("identity of a serving node: %+v, %v", id, err)
	}

	img := filepath.Join(dir, "new.img")
	body, _ := json.Marshal(node.AddDriveRequest{Path: img, Volume: "new", Create: 32 << 20})
	status, _, out := call(t, sock, "POST", "/v1/drives", "application/json", body)
	if status != http.StatusCreated {
		t.Fatalf("POST /v1/drives: %d %s", status, out)
	}
	var res node.AddDriveResult
	if err := json.Unmarshal(out, &res); err != nil || !res.Exported || res.Drive.Volume != "new" || res.Drive.State != node.DrivePresent {
		t.Fatalf("POST /v1/drives: %s, %v", out, err)
	}
	list, err := exec.Command("nbdinfo", "--list", "--json", "nbd+unix:///?socket="+nbdSock).Output()
	if err != nil {
		t.Fatalf("nbdinfo --list: %v", err)
	}
	var info struct {
		Exports []struct {
			Name string `json:"export-name"`
			Size int64  `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal(list, &info); err != nil || len(info.Exports) != 1 || info.Exports[0].Name != "new" || info.Exports[0].Size != 16<<20 {
		t.Fatalf("nbdinfo --list: %s, %v", list, err)
	}
	nc, err := nbd.Dial(ctx, "unix:"+nbdSock, nbd.ClientOptions{Export: "new", Connections: 1, ReconnectTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if _, err := nc.WriteAt([]byte("through the new export"), 0); err != nil {
		t.Fatal(err)
	}
	v, err := c.Volume(ctx, "new")
	if err != nil || !slices.Equal(v.Exports, []string{"new"}) || v.Size != 16<<20 {
		t.Fatalf("volume new: %+v, %v", v, err)
	}
	// The same drive again: it is served, so held: refused, and nothing changes.
	body, _ = json.Marshal(node.AddDriveRequest{Path: img, Force: true})
	if status, _, out := call(t, sock, "POST", "/v1/drives", "application/json", body); status != http.StatusConflict {
		t.Errorf("formatting a served drive: %d %s", status, out)
	}
}

// TestEvents: the event stream carries what happens after Events returns, a rotation
// among it.
func TestEvents(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	addDrive(t, n, dir, "alpha")
	_, c := serveAPI(t, n)
	es, err := c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer es.Close()
	res, err := c.Rotate(ctx, node.RotateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	var last uint64
	for {
		e, err := es.Next()
		if err != nil {
			t.Fatalf("after %q: %v", types, err)
		}
		if e.Seq <= last {
			t.Fatalf("event %d after %d", e.Seq, last)
		}
		last = e.Seq
		types = append(types, e.Type)
		if e.Type == node.EventRotationFinished {
			if e.Data != res.MasterKeyID {
				t.Errorf("rotation-finished names %s, the rotation %s", e.Data, res.MasterKeyID)
			}
			break
		}
	}
	if types[0] != node.EventRotationStarted || !slices.Contains(types, node.EventRotationStep) {
		t.Errorf("events: %q", types)
	}
}

// TestShutdownEndsEvents: Shutdown ends the event streams instead of waiting for them.
func TestShutdownEndsEvents(t *testing.T) {
	n, _ := nodetest.New(t)
	sock := filepath.Join(nodetest.SocketDir(t), "control.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(n, nil)
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	c := NewClient(sock)
	es, err := c.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with an event stream open: %v", err)
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		t.Fatal(err)
	}
	if _, err := es.Next(); err != io.EOF {
		t.Errorf("the stream after shutdown: %v, want io.EOF", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket after shutdown: %v", err)
	}
	if _, err := Dial(t.Context(), sock); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("dial after shutdown: %v, want ErrNoDaemon", err)
	}
}

// TestEventsUnsupported: a Service that publishes no events answers 503 offline.
func TestEventsUnsupported(t *testing.T) {
	n, _ := nodetest.New(t)
	_, c := serveAPI(t, struct{ node.Service }{n})
	if _, err := c.Events(t.Context()); !errors.Is(err, node.ErrOffline) {
		t.Errorf("events of a service without Subscribe: %v", err)
	}
}

// TestBadRequests: requests malformed at the HTTP level are refused with 4xx and a
// JSON error, and change nothing: no image is created, the registry and the keys stay.
func TestBadRequests(t *testing.T) {
	ctx := context.Background()
	n, dir := nodetest.New(t)
	addDrive(t, n, dir, "alpha")
	sock, _ := serveAPI(t, n)
	before, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "new.img")
	good := `{"path": "` + img + `", "create": 33554432}`
	huge := `{"path": "` + img + `", "volume": "` + strings.Repeat("a", MaxBody) + `"}`
	for _, tc := range []struct {
		name, method, path, ctype, body string
		status                          int
		allow                           string
	}{
		{"malformed JSON", "POST", "/v1/drives", "application/json", `{"path": `, 400, ""},
		{"not an object", "POST", "/v1/drives", "application/json", `["x"]`, 400, ""},
		{"unknown field", "POST", "/v1/drives", "application/json", `{"path": "` + img + `", "create": 33554432, "colour": "red"}`, 400, ""},
		{"in-process field", "POST", "/v1/drives", "application/json", `{"path": "` + img + `", "create": 33554432, "Progress": null}`, 400, ""},
		{"trailing data", "POST", "/v1/drives", "application/json", good + ` {}`, 400, ""},
		{"trailing garbage", "POST", "/v1/drives", "application/json", good + `x`, 400, ""},
		{"empty body", "POST", "/v1/drives", "application/json", ``, 400, ""},
		{"wrong type", "POST", "/v1/drives", "application/json", `{"path": "` + img + `", "create": "32M"}`, 400, ""},
		{"huge body", "POST", "/v1/drives", "application/json", huge, 413, ""},
		{"text body", "POST", "/v1/drives", "text/plain", good, 415, ""},
		{"form body", "POST", "/v1/drives", "application/x-www-form-urlencoded", "path=" + img, 415, ""},
		{"no content type", "POST", "/v1/drives", "", good, 415, ""},
		{"relative path", "POST", "/v1/drives", "application/json", `{"path": "new.img", "create": 33554432}`, 400, ""},
		{"volume with slash", "POST", "/v1/drives", "application/json", `{"path": "` + img + `", "create": 33554432, "volume": "a/b"}`, 400, ""},
		{"volume with newline", "POST", "/v1/drives", "application/json", `{"path": "` + img + `", "create": 33554432, "volume": "a\nb"}`, 400, ""},
		{"volume with NUL", "POST", "/v1/drives", "application/json", `{"path": "` + img + `", "create": 33554432, "volume": "a\u0000b"}`, 400, ""},
		{"rotate unknown field", "POST", "/v1/encryption/rotate-keys", "application/json", `{"force": false, "now": true}`, 400, ""},
		{"rotate malformed", "POST", "/v1/encryption/rotate-keys", "application/json", `{"force": fals`, 400, ""},
		{"rotate without content type", "POST", "/v1/encryption/rotate-keys", "", `{"force": true}`, 415, ""},
		{"rotate text", "POST", "/v1/encryption/rotate-keys", "text/plain", `{}`, 415, ""},
		{"rotate huge", "POST", "/v1/encryption/rotate-keys", "application/json", `{"force": false}` + strings.Repeat(" ", MaxBody), 413, ""},
		{"rotate with GET", "GET", "/v1/encryption/rotate-keys", "", ``, 405, "POST"},
		{"status with POST", "POST", "/v1/encryption/status", "application/json", `{}`, 405, "GET, HEAD"},
		{"drives with DELETE", "DELETE", "/v1/drives", "", ``, 405, "GET, HEAD, POST"},
		{"a drive with PUT", "PUT", "/v1/drives/0123456789", "application/json", `{}`, 405, "GET, HEAD"},
		{"unknown path", "GET", "/v1/nothing", "", ``, 404, ""},
		{"unversioned path", "GET", "/drives", "", ``, 404, ""},
		{"volume name with slash", "GET", "/v1/volumes/a%2Fb", "", ``, 400, ""},
		{"volume name with newline", "GET", "/v1/volumes/a%0Ab", "", ``, 400, ""},
		{"volume name with NUL", "GET", "/v1/volumes/a%00b", "", ``, 400, ""},
		{"volume name with dots", "GET", "/v1/volumes/..%2F..", "", ``, 400, ""},
		{"volume name too long", "GET", "/v1/volumes/" + strings.Repeat("a", 65), "", ``, 400, ""},
		{"drive name with newline", "GET", "/v1/drives/0123456789%0A", "", ``, 400, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body []byte
			if tc.body != "" {
				body = []byte(tc.body)
			}
			status, h, out := call(t, sock, tc.method, tc.path, tc.ctype, body)
			var e ErrorBody
			dec := json.NewDecoder(bytes.NewReader(out))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&e); status != tc.status || err != nil || e.Error.Code == "" || e.Error.Message == "" || h.Get("Content-Type") != "application/json" {
				t.Fatalf("%s %s: %d %q %s, want %d and a JSON error", tc.method, tc.path, status, h.Get("Content-Type"), out, tc.status)
			}
			if want := map[int]string{404: "not-found"}[status]; want == "" && e.Error.Code != "invalid" || want != "" && e.Error.Code != want {
				t.Errorf("code %q for %d", e.Error.Code, status)
			}
			if h.Get("Allow") != tc.allow {
				t.Errorf("Allow: %q, want %q", h.Get("Allow"), tc.allow)
			}
		})
	}
	after, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before.MasterKeyAge, after.MasterKeyAge = 0, 0
	if !sameJSON(t, before, after) {
		t.Errorf("the bad requests changed the node:\n%+v\n%+v", before, after)
	}
	if _, err := os.Stat(img); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a bad request left an image: %v", err)
	}
}

// TestListen: the socket is 0600 in a directory made 0755; a stale socket is replaced,
// a live one refused with ErrInUse, a file that is not a socket left alone.
func TestListen(t *testing.T) {
	dir := filepath.Join(nodetest.SocketDir(t), "run", "atrest")
	sock := filepath.Join(dir, "control.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket: %v, %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("directory: %v, %v", fi.Mode(), err)
	}
	if _, err := Listen(sock); !errors.Is(err, ErrInUse) {
		t.Errorf("a second Listen while the first listens: %v, want ErrInUse", err)
	}
	// A daemon that died leaves its socket behind.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatal(err)
	}
	if _, err := Dial(t.Context(), sock); !errors.Is(err, ErrNoDaemon) {
		t.Errorf("dial a stale socket: %v, want ErrNoDaemon", err)
	}
	l, err = Listen(sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket after Close: %v", err)
	}
	if err := os.WriteFile(sock, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(sock); err == nil || errors.Is(err, ErrInUse) {
		t.Errorf("Listen over a regular file: %v", err)
	}
	if b, err := os.ReadFile(sock); err != nil || string(b) != "keep" {
		t.Errorf("the regular file after Listen: %q, %v", b, err)
	}
}

// TestNoDaemon: Dial says ErrNoDaemon when the socket is not there (or its directory is
// not), so that the CLI works offline.
func TestNoDaemon(t *testing.T) {
	dir := nodetest.SocketDir(t)
	for _, p := range []string{filepath.Join(dir, "control.sock"), filepath.Join(dir, "run", "control.sock")} {
		if _, err := Dial(t.Context(), p); !errors.Is(err, ErrNoDaemon) || !strings.Contains(err.Error(), p) {
			t.Errorf("Dial(%s): %v, want ErrNoDaemon naming the socket", p, err)
		}
	}
}

// TestGarbageAnswers: a client of something that is not an atrest daemon gets errors
// that name the endpoint, never a panic or a zero answer taken for a real one.
func TestGarbageAnswers(t *testing.T) {
	for _, tc := range []struct{ name, answer string }{
		{"not HTTP", "SSH-2.0-OpenSSH_9.2\r\n"},
		{"HTML", "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>"},
		{"truncated JSON", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"keystore\":"},
		{"trailing data", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 6\r\n\r\n{} {}\n"},
		{"an array", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"},
		{"an empty object", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"},
		{"wrong types", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 31\r\n\r\n{\"keystore\":1,\"cluster_uuid\":2}"},
		{"error in plain text", "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\noops"},
		{"error without a code", "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"},
		{"closed at once", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(nodetest.SocketDir(t), "control.sock")
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					go func() {
						defer c.Close()
						c.SetDeadline(time.Now().Add(10 * time.Second))
						buf := make([]byte, 4096)
						c.Read(buf)
						io.WriteString(c, tc.answer)
					}()
				}
			}()
			_, err = Dial(t.Context(), sock)
			if err == nil || !strings.Contains(err.Error(), "/v1/identity") || errors.Is(err, ErrNoDaemon) {
				t.Errorf("Dial: %v", err)
			}
			c := NewClient(sock)
			defer c.Close()
			_, err = c.Status(t.Context())
			if err == nil && tc.name != "an empty object" || err != nil && !strings.Contains(err.Error(), "GET /v1/node/status") {
				t.Errorf("Status: %v", err)
			}
			_, err = c.Drives(t.Context())
			if err == nil && tc.name != "an array" || err != nil && !strings.Contains(err.Error(), "GET /v1/drives") {
				t.Errorf("Drives: %v", err)
			}
		})
	}
}

// TestDrivePathEscaping: a drive named by a path travels escaped and is found.
func TestDrivePathEscaping(t *testing.T) {
	n, dir := nodetest.New(t)
	sub := filepath.Join(dir, "a b%2F")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := n.AddDrive(t.Context(), node.AddDriveRequest{Path: filepath.Join(sub, "x?#.img"), Create: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	sock, c := serveAPI(t, n)
	d, err := c.Drive(t.Context(), res.Drive.Path)
	if err != nil || d.UUID != res.Drive.UUID {
		t.Fatalf("drive by path %q: %+v, %v", res.Drive.Path, d, err)
	}
	status, _, out := call(t, sock, "GET", "/v1/drives/"+url.PathEscape(res.Drive.Path), "", nil)
	if status != 200 || !strings.Contains(string(out), res.Drive.UUID) {
		t.Errorf("GET by escaped path: %d %s", status, out)
	}
}

// heldAdd is the node with AddDrive held until release is closed.
type heldAdd struct {
	*node.Node
	started, release chan struct{}
}

func (h *heldAdd) AddDrive(ctx context.Context, req node.AddDriveRequest) (*node.AddDriveResult, error) {
	close(h.started)
	<-h.release
	return h.Node.AddDrive(ctx, req)
}

// TestShutdownFinishesRequests: a request under way when Shutdown starts is answered,
// its context not cancelled (a format with a wipe, which checks it, completes).
func TestShutdownFinishesRequests(t *testing.T) {
	n, dir := nodetest.New(t)
	h := &heldAdd{Node: n, started: make(chan struct{}), release: make(chan struct{})}
	sock := filepath.Join(nodetest.SocketDir(t), "control.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(h, nil)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	added := make(chan error, 1)
	go func() {
		_, err := NewClient(sock).AddDrive(context.Background(), node.AddDriveRequest{Path: filepath.Join(dir, "a.img"), Create: 32 << 20, Wipe: true})
		added <- err
	}()
	<-h.started
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		shut <- s.Shutdown(ctx)
	}()
	// Shutdown has begun once the socket is gone (it closes the listener first).
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Shutdown did not close the listener")
		}
	}
	close(h.release)
	if err := <-added; err != nil {
		t.Errorf("the request under way at Shutdown: %v", err)
	}
	if err := <-shut; err != nil {
		t.Errorf("shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("serve: %v", err)
	}
}

// TestRemoveVolume: DELETE /v1/volumes/{name} removes a volume through the Client; a
// volume that is not there is 404, a bad force value or a body 400, and nothing changes
// on a refusal.
func TestRemoveVolume(t *testing.T) {
	n, dir := nodetest.New(t)
	addDrive(t, n, dir, "keep")
	addDrive(t, n, dir, "gone")
	sock, c := serveAPI(t, n)
	ctx := context.Background()
	for _, tc := range []struct {
		path string
		body []byte
		want int
	}{
		{"/v1/volumes/gone?force=maybe", nil, http.StatusBadRequest},
		{"/v1/volumes/gone", []byte(`{"force":true}`), http.StatusBadRequest},
		{"/v1/volumes/nope", nil, http.StatusNotFound},
		{"/v1/volumes/a%0Ab", nil, http.StatusBadRequest},
	} {
		if code, _, b := call(t, sock, "DELETE", tc.path, "", tc.body); code != tc.want {
			t.Errorf("DELETE %s: %d %s, want %d", tc.path, code, b, tc.want)
		}
	}
	if vols, _ := n.Volumes(ctx); len(vols) != 2 {
		t.Fatalf("a refused removal changed the volumes: %+v", vols)
	}
	v, err := c.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "gone"})
	if err != nil || v.Name != "gone" {
		t.Fatalf("RemoveVolume: %+v, %v", v, err)
	}
	if _, err := c.Volume(ctx, "gone"); !errors.Is(err, node.ErrNotFound) {
		t.Fatalf("the removed volume: %v", err)
	}
	if _, err := c.RemoveVolume(ctx, node.RemoveVolumeRequest{Name: "gone", Force: true}); !errors.Is(err, node.ErrNotFound) {
		t.Fatalf("remove it again: %v", err)
	}
}
