package api_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/node/api"
)

// A command finds the daemon through its control socket and, when none answers or the
// daemon serves another keystore, works on the keystore directly.
func ExampleDial() {
	ctx := context.Background()
	keystoreDir := "/var/lib/atrest/keystore" // as the command was given it, made absolute, symlinks resolved
	var svc node.Service
	c, err := api.Dial(ctx, api.DefaultSocket)
	switch {
	case errors.Is(err, api.ErrNoDaemon):
		// No daemon: offline.
	case err != nil:
		fmt.Fprintln(os.Stderr, err) // e.g. not root: os.ErrPermission
		return
	default:
		defer c.Close()
		if id, err := c.Identity(ctx); err == nil && id.Keystore == keystoreDir {
			svc = c
		}
	}
	if svc == nil {
		n, err := node.Open(ctx, node.Config{Keystore: keystoreDir})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return
		}
		svc = n
	}
	res, err := svc.Rotate(ctx, node.RotateRequest{})
	if errors.Is(err, node.ErrRotationRunning) {
		fmt.Println("a rotation is running already")
		return
	}
	if err == nil {
		fmt.Println("Key rotation complete:", res.MasterKeyID)
	}
}

// The daemon serves the control API of its node beside its NBD listeners.
func ExampleServer() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	log := slog.Default()
	n, err := node.Open(ctx, node.Config{Keystore: "/var/lib/atrest/keystore", Logger: log})
	if err == nil {
		err = n.Start(ctx)
	}
	if err != nil {
		log.Error("start", "err", err)
		return
	}
	l, err := api.Listen(api.DefaultSocket) // api.ErrInUse if a daemon answers there
	if err != nil {
		log.Error("control socket", "err", err)
		return
	}
	s := api.NewServer(n, log)
	go func() {
		if err := s.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			log.Error("control API", "err", err)
		}
	}()
	<-ctx.Done()
	s.Shutdown(context.Background())
	n.Shutdown(context.Background())
}
