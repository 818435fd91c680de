package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"

	"github.com/atrest/atrest/node"
)

// ErrNoDaemon: nothing listens on the control socket (it does not exist, or no process
// accepts on it): the caller works on the keystore directly.
var ErrNoDaemon = errors.New("no atrest daemon answers")

// maxResponse bounds a response body the client reads (a status of thousands of drives
// is far below).
const maxResponse = 64 << 20

// Client calls the control API of a daemon; it implements node.Service.
type Client struct {
	path string
	hc   *http.Client
	tr   *http.Transport
}

var _ node.Service = (*Client)(nil)

// NewClient returns a client of the daemon at the unix socket path; nothing is
// connected yet (Dial checks that a daemon answers).
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns: 4,
	}
	// No time-out here: a rotation answers when it is done; the caller's context bounds
	// each call.
	return &Client{path: path, tr: tr, hc: &http.Client{Transport: tr}}
}

// Dial returns a client of the daemon at the unix socket path, once it has answered
// GET /v1/identity. When nothing listens there the error matches ErrNoDaemon; a caller
// that is not root gets an error matching os.ErrPermission (the socket's mode refuses
// it, or the daemon does).
func Dial(ctx context.Context, path string) (*Client, error) {
	c := NewClient(path)
	if _, err := c.Identity(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Path is the socket's path.
func (c *Client) Path() string { return c.path }

// Close closes the idle connections.
func (c *Client) Close() error {
	c.tr.CloseIdleConnections()
	return nil
}

// do sends a request and decodes the answer into out; want is the status of success.
// A node error comes back as *node.RemoteError; anything else unexpected is an error
// that names the endpoint.
func (c *Client) do(ctx context.Context, method, path string, in any, want int, out any) error {
	endpoint := method + " " + path
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%s: %w", endpoint, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://atrest"+path, body)
	if err != nil {
		return fmt.Errorf("%s: %w", endpoint, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.transportError(endpoint, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return fmt.Errorf("control API %s: read the answer: %w", endpoint, err)
	}
	if len(b) > maxResponse {
		return fmt.Errorf("control API %s: an answer over %d bytes", endpoint, maxResponse)
	}
	if resp.StatusCode != want {
		return remoteError(endpoint, resp, b)
	}
	if err := decodeStrict(resp, b, out); err != nil {
		return fmt.Errorf("control API %s: HTTP %s with an answer that is not the JSON expected: %w: %q", endpoint, resp.Status, err, snippet(b))
	}
	return nil
}

// remoteError is the error of an answer that is not a success: the node's error, as a
// *node.RemoteError, or an error that says the answer is not an atrest error.
func remoteError(endpoint string, resp *http.Response, b []byte) error {
	var e ErrorBody
	if decodeStrict(resp, b, &e) == nil && e.Error.Code != "" {
		return &node.RemoteError{Code: e.Error.Code, Message: e.Error.Message}
	}
	return fmt.Errorf("control API %s: HTTP %s and not an atrest error: %q", endpoint, resp.Status, snippet(b))
}

// transportError says that no daemon answers (ErrNoDaemon) when the socket is not
// there or nobody accepts on it.
func (c *Client) transportError(endpoint string, err error) error {
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("control socket %s: %w: %w", c.path, ErrNoDaemon, err)
	}
	return fmt.Errorf("control API %s: %w", endpoint, err)
}

// decodeStrict decodes one JSON value of type application/json with nothing after it.
// Unknown fields are accepted: a newer daemon may say more.
func decodeStrict(resp *http.Response, b []byte, out any) error {
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return fmt.Errorf("content type %q, not application/json", resp.Header.Get("Content-Type"))
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(out); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the JSON value")
	}
	return nil
}

// snippet is the start of a body, for an error message.
func snippet(b []byte) string {
	const n = 200
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}

// Identity says which keystore and cluster the daemon serves.
func (c *Client) Identity(ctx context.Context) (*node.Identity, error) {
	var v node.Identity
	if err := c.do(ctx, "GET", "/v1/identity", nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	// The CLI decides by it whether the daemon serves its keystore: an answer without
	// one is no answer.
	if v.Keystore == "" || v.ClusterUUID == "" {
		return nil, fmt.Errorf("control API GET /v1/identity: the answer names no keystore or cluster")
	}
	return &v, nil
}

// EncryptionStatus is GET /v1/encryption/status.
func (c *Client) EncryptionStatus(ctx context.Context) (*node.EncryptionStatus, error) {
	var v node.EncryptionStatus
	if err := c.do(ctx, "GET", "/v1/encryption/status", nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Status is GET /v1/node/status.
func (c *Client) Status(ctx context.Context) (*node.Status, error) {
	var v node.Status
	if err := c.do(ctx, "GET", "/v1/node/status", nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Rotate is POST /v1/encryption/rotate-keys; req.Step is not called (the daemon's
// steps are events: see Events).
func (c *Client) Rotate(ctx context.Context, req node.RotateRequest) (*node.RotateResult, error) {
	var v node.RotateResult
	if err := c.do(ctx, "POST", "/v1/encryption/rotate-keys", RotateBody{Force: req.Force}, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Drives is GET /v1/drives.
func (c *Client) Drives(ctx context.Context) ([]node.DriveStatus, error) {
	var v []node.DriveStatus
	if err := c.do(ctx, "GET", "/v1/drives", nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// Drive is GET /v1/drives/{name}, name escaped (a path's slashes included).
func (c *Client) Drive(ctx context.Context, name string) (*node.DriveStatus, error) {
	var v node.DriveStatus
	if err := c.do(ctx, "GET", "/v1/drives/"+url.PathEscape(name), nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// AddDrive is POST /v1/drives; req.Progress is not called.
func (c *Client) AddDrive(ctx context.Context, req node.AddDriveRequest) (*node.AddDriveResult, error) {
	var v node.AddDriveResult
	if err := c.do(ctx, "POST", "/v1/drives", req, http.StatusCreated, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Volumes is GET /v1/volumes.
func (c *Client) Volumes(ctx context.Context) ([]node.VolumeStatus, error) {
	var v []node.VolumeStatus
	if err := c.do(ctx, "GET", "/v1/volumes", nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return v, nil
}

// Volume is GET /v1/volumes/{name}.
func (c *Client) Volume(ctx context.Context, name string) (*node.VolumeStatus, error) {
	var v node.VolumeStatus
	if err := c.do(ctx, "GET", "/v1/volumes/"+url.PathEscape(name), nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// RemoveVolume is DELETE /v1/volumes/{name}[?force=true].
func (c *Client) RemoveVolume(ctx context.Context, req node.RemoveVolumeRequest) (*node.VolumeStatus, error) {
	var v node.VolumeStatus
	path := "/v1/volumes/" + url.PathEscape(req.Name)
	if req.Force {
		path += "?force=true"
	}
	if err := c.do(ctx, "DELETE", path, nil, http.StatusOK, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// EventStream is the daemon's events from the moment Events returned.
type EventStream struct {
	body io.ReadCloser
	sc   *bufio.Scanner
}

// Events subscribes to the daemon's events (GET /v1/events); it returns once the
// daemon has subscribed, so that every event after that is in the stream. The stream
// ends when ctx ends, Close is called or the daemon stops.
func (c *Client) Events(ctx context.Context) (*EventStream, error) {
	const endpoint = "GET /v1/events"
	req, err := http.NewRequestWithContext(ctx, "GET", "http://atrest/v1/events", nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", endpoint, err)
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, c.transportError(endpoint, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return nil, remoteError(endpoint, resp, b)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/event-stream" {
		resp.Body.Close()
		return nil, fmt.Errorf("control API %s: content type %q, not text/event-stream", endpoint, resp.Header.Get("Content-Type"))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	s := &EventStream{body: resp.Body, sc: sc}
	// The server's first line, a comment, says that it has subscribed.
	if _, err := s.Next(); err != errSubscribed {
		s.Close()
		if err == nil || err == io.EOF {
			err = errors.New("the stream does not start with the subscription")
		}
		return nil, fmt.Errorf("control API %s: %w", endpoint, err)
	}
	return s, nil
}

// errSubscribed is what Next returns for the stream's first comment, inside Events.
var errSubscribed = errors.New("subscribed")

// Next returns the next event; io.EOF when the stream has ended.
func (s *EventStream) Next() (node.Event, error) {
	var data []string
	for s.sc.Scan() {
		line := s.sc.Text()
		switch {
		case line == "":
			if data == nil {
				continue
			}
			var e node.Event
			if err := json.Unmarshal([]byte(strings.Join(data, "\n")), &e); err != nil {
				return node.Event{}, fmt.Errorf("control API GET /v1/events: an event that is not the JSON expected: %w", err)
			}
			return e, nil
		case line == ": subscribed":
			return node.Event{}, errSubscribed
		case strings.HasPrefix(line, ":"): // a comment (heartbeat)
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
		}
		// id and event fields repeat what the data holds.
	}
	if err := s.sc.Err(); err != nil {
		return node.Event{}, fmt.Errorf("control API GET /v1/events: %w", err)
	}
	return node.Event{}, io.EOF
}

// Close ends the stream.
func (s *EventStream) Close() error { return s.body.Close() }
