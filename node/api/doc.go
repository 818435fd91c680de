// Package api is the control API of an atrest node: HTTP/JSON on a unix socket, served by
// the daemon (Server, Listen) and called by the CLI (Client, which implements
// node.Service, so that a command prints what the daemon answers as it prints what an
// offline node.Node answers). The endpoints, the error codes and the mapping to the
// product's shape are in docs/api.md; docs/api/openapi.json describes every endpoint, and
// a test checks it against the handlers.
//
// Only root talks to the daemon: the socket is created with mode 0600, and the server
// checks every connection's peer with SO_PEERCRED, so that a socket whose mode was
// loosened, or a descriptor passed on, still refuses another uid (with HTTP 403 and the
// error code "permission": the connection stays usable for the error to arrive).
//
// Errors travel as {"error": {"code": "...", "message": "..."}}: the code is the class
// node.ErrorCode gives the error, and the Client turns it back into a *node.RemoteError
// that matches the same sentinels (errors.Is(err, node.ErrRotationRunning) holds on
// both sides). Requests that are malformed at the HTTP level (bad JSON, unknown fields,
// trailing data, a wrong method, content type or size) are refused with 4xx and the
// code "invalid" before the node sees them, so they change nothing.
//
// Server and Client are safe for concurrent use.
package api
