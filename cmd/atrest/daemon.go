package main

import (
	"context"

	"github.com/atrest/atrest/node"
)

// daemonClient is the daemon's control API, as a node.Service.
type daemonClient interface {
	node.Service
	Close() error
}

// dialDaemon returns the daemon's control API at control if a daemon answers there and
// serves the keystore in dir; nil otherwise (the command then works on the keystore
// directly).
func dialDaemon(ctx context.Context, dir, control string) daemonClient {
	return nil // TODO(lead): node/api client once it lands
}

// serveControl serves the node's control API on o.control until the returned stop is
// called; an error of the API server after it started goes to errs.
func serveControl(ctx context.Context, n *node.Node, o serveOptions, errs chan<- error) (stop func(), err error) {
	return func() {}, nil // TODO(lead): node/api server once it lands
}
