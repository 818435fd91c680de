package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/registry"
)

const (
	// MaxBody bounds a request body (413 beyond).
	MaxBody = 64 << 10
	// bodyTimeout bounds the time a client takes to send its body; headers are bounded
	// by the http.Server's ReadHeaderTimeout. (The server's ReadTimeout is not used: once
	// the body is read, its deadline would cancel the context of a long rotation.)
	bodyTimeout = 30 * time.Second
	// heartbeat is how often an idle event stream gets a comment line, so that a
	// client gone away is noticed and a client can tell a quiet node from a hung one.
	heartbeat = 30 * time.Second
	// rootUID is the only peer the server answers.
	rootUID = 0
)

// Server serves the control API of a node.Service.
type Server struct {
	svc  node.Service
	log  *slog.Logger
	mux  *http.ServeMux
	http *http.Server
	// base is cancelled by Shutdown, which ends the event streams (http.Server.Shutdown
	// waits for requests to finish, and a stream never does by itself); other requests'
	// contexts do not derive from it, so that the requests under way finish.
	base   context.Context
	cancel context.CancelFunc
}

// Subscriber is what a node.Service implements to publish events (*node.Node does);
// GET /v1/events needs it.
type Subscriber interface {
	Subscribe(ctx context.Context) <-chan node.Event
}

// route is one endpoint. The table is the API: the mux is built from it, and the test
// of docs/api/openapi.json checks the document against the mux.
type route struct {
	method, path string
	h            func(*Server, http.ResponseWriter, *http.Request) (status int, body any, err error)
}

var routes = []route{
	{"GET", "/v1/identity", (*Server).identity},
	{"GET", "/v1/encryption/status", (*Server).encryptionStatus},
	{"POST", "/v1/encryption/rotate-keys", (*Server).rotate},
	{"GET", "/v1/node/status", (*Server).status},
	{"GET", "/v1/drives", (*Server).drives},
	{"POST", "/v1/drives", (*Server).addDrive},
	{"GET", "/v1/drives/{id}", (*Server).drive},
	{"GET", "/v1/volumes", (*Server).volumes},
	{"GET", "/v1/volumes/{name}", (*Server).volume},
	{"DELETE", "/v1/volumes/{name}", (*Server).removeVolume},
	{"GET", "/v1/events", nil}, // a stream: (*Server).events
}

// NewServer returns a server of svc's control API; logger (nil: none) gets the refused
// peers, the changes requested and the failures.
func NewServer(svc node.Service, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{svc: svc, log: logger, mux: http.NewServeMux()}
	s.base, s.cancel = context.WithCancel(context.Background())
	for _, rt := range routes {
		pattern := rt.method + " " + rt.path
		if rt.h == nil {
			s.mux.HandleFunc(pattern, s.events)
			continue
		}
		h := rt.h
		s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			status, body, err := h(s, w, r)
			if err != nil {
				s.writeError(w, r, err)
				return
			}
			writeJSON(w, status, body)
		})
	}
	s.http = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		// No WriteTimeout: a rotation answers when it is done, and an event stream lasts.
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, peerKey{}, peerOf(c))
		},
	}
	return s
}

// Serve answers the API on l (a unix socket: see Listen) until Shutdown, then returns
// http.ErrServerClosed.
func (s *Server) Serve(l net.Listener) error { return s.http.Serve(l) }

// Shutdown stops the server: the listeners close, event streams end, requests under
// way finish (a rotation runs to its end) until ctx ends, then connections are closed.
func (s *Server) Shutdown(ctx context.Context) error {
	s.cancel()
	err := s.http.Shutdown(ctx)
	if err != nil {
		s.http.Close()
	}
	return err
}

// ServeHTTP checks the peer, then routes; what the mux refuses (unknown path, wrong
// method) is answered with the JSON error too.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// A request that came by no connection of this server's (no credentials read) is
	// refused too.
	if p, ok := r.Context().Value(peerKey{}).(peer); !ok || p.err != nil || p.uid != rootUID {
		s.log.Warn("control API: refused a peer that is not root", "uid", p.uid, "pid", p.pid, "err", p.err, "method", r.Method, "path", r.URL.Path)
		why := fmt.Sprintf("uid %d", p.uid)
		if p.err != nil {
			why = p.err.Error()
		}
		s.writeError(w, r, fmt.Errorf("the atrest control API answers root only (peer: %s): %w", why, os.ErrPermission))
		return
	}
	h, pattern := s.mux.Handler(r)
	if pattern != "" {
		s.mux.ServeHTTP(w, r) // which sets the path values
		return
	}
	// The mux's own answer (404, or 405 with Allow) in plain text: keep its status and
	// Allow, answer in JSON.
	rec := &recorder{header: http.Header{}}
	h.ServeHTTP(rec, r)
	if allow := rec.header.Get("Allow"); allow != "" {
		w.Header().Set("Allow", allow)
	}
	switch rec.status {
	case http.StatusMethodNotAllowed:
		s.writeError(w, r, &httpError{http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s (allowed: %s): %w", r.Method, r.URL.Path, rec.header.Get("Allow"), node.ErrInvalid)})
	default:
		s.writeError(w, r, fmt.Errorf("no endpoint %s: %w", r.URL.Path, node.ErrNotFound))
	}
}

// recorder takes the mux's answer to a request it does not route.
type recorder struct {
	header http.Header
	status int
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return len(b), nil
}
func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}

// httpError is a refusal with an HTTP status more precise than its class's (405, 413,
// 415); its class (node.ErrorCode) is that of err.
type httpError struct {
	status int
	err    error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

// ErrorBody is the body of every error answer.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is an error: its class (node.ErrorCode) and message.
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	code, status := node.ErrorCode(err)
	var he *httpError
	if errors.As(err, &he) {
		status = he.status
	}
	level := slog.LevelDebug
	if status >= 500 {
		level = slog.LevelError
	}
	s.log.Log(r.Context(), level, "control API: request failed", "method", r.Method, "path", r.URL.Path, "status", status, "code", code, "err", err)
	writeJSON(w, status, ErrorBody{ErrorDetail{Code: code, Message: err.Error()}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		// Every body is a type of package node or of this package: this does not happen.
		panic(fmt.Sprintf("BUG: marshal %T: %v", v, err))
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(b)
}

// decodeBody decodes the JSON body of r into v: one JSON value of at most MaxBody bytes,
// application/json, with no field v does not have and nothing after it. An empty body
// is accepted (v left as is) if optional.
func decodeBody(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	ct := r.Header.Get("Content-Type")
	badType := func() error {
		return &httpError{http.StatusUnsupportedMediaType, fmt.Errorf("content type %q: send application/json: %w", ct, node.ErrInvalid)}
	}
	if ct != "" || !optional {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return badType()
		}
	}
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(bodyTimeout))
	defer rc.SetReadDeadline(time.Time{})
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBody))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return &httpError{http.StatusRequestEntityTooLarge, fmt.Errorf("request body over %d bytes: %w", MaxBody, node.ErrInvalid)}
	case err != nil:
		return fmt.Errorf("read the request body: %w: %w", node.ErrInvalid, err)
	case len(bytes.TrimSpace(b)) == 0 && optional:
		return nil
	case ct == "":
		return badType()
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request body: %w: %w", node.ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("request body: data after the JSON value: %w", node.ErrInvalid)
	}
	return nil
}

func (s *Server) identity(w http.ResponseWriter, r *http.Request) (int, any, error) {
	v, err := s.svc.Identity(r.Context())
	return http.StatusOK, v, err
}

func (s *Server) encryptionStatus(w http.ResponseWriter, r *http.Request) (int, any, error) {
	v, err := s.svc.EncryptionStatus(r.Context())
	return http.StatusOK, v, err
}

// RotateBody is the optional body of POST /v1/encryption/rotate-keys.
type RotateBody struct {
	Force bool `json:"force"`
}

// rotate runs the rotation to its end even if the client goes away: stopped half-way,
// it would leave a journal that only another rotation finishes.
func (s *Server) rotate(w http.ResponseWriter, r *http.Request) (int, any, error) {
	var req RotateBody
	if err := decodeBody(w, r, &req, true); err != nil {
		return 0, nil, err
	}
	s.log.Info("control API: key rotation requested", "force", req.Force)
	v, err := s.svc.Rotate(context.WithoutCancel(r.Context()), node.RotateRequest{Force: req.Force})
	return http.StatusOK, v, err
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) (int, any, error) {
	v, err := s.svc.Status(r.Context())
	return http.StatusOK, v, err
}

func (s *Server) drives(w http.ResponseWriter, r *http.Request) (int, any, error) {
	v, err := s.svc.Drives(r.Context())
	return http.StatusOK, v, err
}

func (s *Server) drive(w http.ResponseWriter, r *http.Request) (int, any, error) {
	id := r.PathValue("id")
	if id == "" || strings.ContainsFunc(id, unicode.IsControl) {
		return 0, nil, fmt.Errorf("drive name %q: want a UUID, a UUID prefix or a path, without control characters: %w", id, node.ErrInvalid)
	}
	v, err := s.svc.Drive(r.Context(), id)
	return http.StatusOK, v, err
}

// addDrive formats or adopts a drive; a client that goes away cancels it (a wipe stops,
// an image the request created is removed).
func (s *Server) addDrive(w http.ResponseWriter, r *http.Request) (int, any, error) {
	var req node.AddDriveRequest
	if err := decodeBody(w, r, &req, false); err != nil {
		return 0, nil, err
	}
	s.log.Info("control API: drive format requested", "path", req.Path, "volume", req.Volume, "adopt", req.AdoptKeyFile != "")
	v, err := s.svc.AddDrive(r.Context(), req)
	return http.StatusCreated, v, err
}

func (s *Server) volumes(w http.ResponseWriter, r *http.Request) (int, any, error) {
	v, err := s.svc.Volumes(r.Context())
	return http.StatusOK, v, err
}

func (s *Server) volume(w http.ResponseWriter, r *http.Request) (int, any, error) {
	name := r.PathValue("name")
	if !registry.ValidVolumeName(name) {
		return 0, nil, fmt.Errorf("volume name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", name, node.ErrInvalid)
	}
	v, err := s.svc.Volume(r.Context(), name)
	return http.StatusOK, v, err
}

// removeVolume stops serving a volume and removes it from the node (?force=true: even
// while clients are connected).
func (s *Server) removeVolume(w http.ResponseWriter, r *http.Request) (int, any, error) {
	name := r.PathValue("name")
	if !registry.ValidVolumeName(name) {
		return 0, nil, fmt.Errorf("volume name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", name, node.ErrInvalid)
	}
	force := false
	switch f := r.URL.Query().Get("force"); f {
	case "", "false":
	case "true":
		force = true
	default:
		return 0, nil, fmt.Errorf("force=%q: want true or false: %w", f, node.ErrInvalid)
	}
	if r.ContentLength > 0 {
		return 0, nil, fmt.Errorf("DELETE takes no body: %w", node.ErrInvalid)
	}
	s.log.Info("control API: volume removal requested", "volume", name, "force", force)
	v, err := s.svc.RemoveVolume(r.Context(), node.RemoveVolumeRequest{Name: name, Force: force})
	return http.StatusOK, v, err
}

// events streams the node's events from now on as server-sent events: each is
// "id: SEQ", "event: TYPE", "data: JSON of node.Event". The stream starts with a
// comment line once the subscription is made (an event published after the client has
// read the headers is in the stream), and carries one every 30 s while idle.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	sub, ok := s.svc.(Subscriber)
	if !ok {
		s.writeError(w, r, fmt.Errorf("this service publishes no events: %w", node.ErrOffline))
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(s.base, cancel)()
	ch := sub.Subscribe(ctx)
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	if _, err := io.WriteString(w, ": subscribed\n\n"); err != nil || rc.Flush() != nil {
		return
	}
	tick := time.NewTicker(heartbeat)
	defer tick.Stop()
	for {
		var err error
		select {
		case e, ok := <-ch:
			if !ok {
				return
			}
			b, merr := json.Marshal(e)
			if merr != nil {
				panic(fmt.Sprintf("BUG: marshal event: %v", merr))
			}
			_, err = fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", e.Seq, e.Type, b)
		case <-tick.C:
			_, err = io.WriteString(w, ": ping\n\n")
		case <-ctx.Done():
			return
		}
		if err != nil || rc.Flush() != nil {
			return
		}
	}
}

// peer is the credentials of a connection's other end.
type peer struct {
	uid uint32
	pid int32
	err error
}

type peerKey struct{}

// peerOf reads the peer's credentials (SO_PEERCRED: as they were when it connected).
func peerOf(c net.Conn) peer {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return peer{err: fmt.Errorf("a %T, not a unix socket connection: no credentials to check", c)}
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return peer{err: err}
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return peer{err: err}
	}
	if cerr != nil {
		return peer{err: fmt.Errorf("SO_PEERCRED: %w", cerr)}
	}
	return peer{uid: cred.Uid, pid: cred.Pid}
}
