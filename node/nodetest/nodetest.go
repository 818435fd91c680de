// Package nodetest makes real nodes for tests: a keystore in a temporary directory, an
// offline node.Node on it, and the node serving NBD on a unix socket.
package nodetest

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/node"
)

// New makes a keystore in a temporary directory and opens its node, offline. It
// returns the node and the directory, for drive images.
func New(t *testing.T) (*node.Node, string) {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "keystore")
	l, err := keystore.Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	n, err := node.Open(context.Background(), node.Config{Keystore: dir, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	return n, root
}

// SocketDir is a directory for sockets with a short path (a unix socket's path is
// bounded to 107 bytes, which t.TempDir's can pass), mode 0755 so that another uid
// reaches what is in it; removed at cleanup.
func SocketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "atrest-node-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Serve starts n and serves it on a unix socket in a new socket directory, whose path
// it returns; at cleanup the node shuts down gracefully, and a failure of the shutdown
// or of serving fails the test.
func Serve(t *testing.T, n *node.Node) string {
	t.Helper()
	ctx := context.Background()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(SocketDir(t), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- n.Serve(ctx, l) }()
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := n.Shutdown(sctx); err != nil {
			t.Errorf("node shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("node serve: %v", err)
		}
	})
	return sock
}
