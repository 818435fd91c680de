package main

import (
	"context"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/node"
)

// defaultControl is where the daemon answers its control API unless --control moves
// it.
const defaultControl = "/run/atrest/control.sock"

// controlFlag is the --control flag of the commands that ask the daemon.
func controlFlag() *cli.StringFlag {
	return &cli.StringFlag{
		Name:    "control",
		Usage:   "the daemon's control socket: the command goes through the daemon when it serves the same keystore",
		EnvVars: []string{"ATREST_CONTROL"},
		Value:   defaultControl,
	}
}

// service returns what answers for the keystore in dir: the daemon, through its
// control API at control, when it runs and serves that very keystore; otherwise an
// offline node.Node on the keystore itself. The second result says which, for
// messages; close releases it.
func service(ctx context.Context, dir, control string) (svc node.Service, daemon bool, close func(), err error) {
	if c := dialDaemon(ctx, dir, control); c != nil {
		return c, true, func() { c.Close() }, nil
	}
	n, err := node.Open(ctx, node.Config{Keystore: dir, Version: version()})
	if err != nil {
		return nil, false, nil, keystoreError(err)
	}
	return n, false, func() {}, nil
}

// warnf prints a warning of the CLI.
func warnf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "atrest: warning: "+format+"\n", args...)
}
