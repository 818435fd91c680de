// Command atrest is encryption at rest for Linux storage nodes: it formats drives with
// LUKS2 headers whose data keys a master key on the boot drive wraps, serves the
// decrypted volumes over NBD, mounts them through FUSE, rotates the master key online
// and reports the encryption status.
package main

import (
	"context"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
)

// commands holds every subcommand; each cmd_<verb>.go file registers its own in init,
// so that adding a command touches one file.
var commands []*cli.Command

func register(c *cli.Command) { commands = append(commands, c) }

func newApp() *cli.App {
	slices.SortFunc(commands, func(a, b *cli.Command) int { return strings.Compare(a.Name, b.Name) })
	oneLineUsageErrors(commands)
	return &cli.App{
		Name:                 "atrest",
		Usage:                "encryption at rest for Linux storage nodes",
		Version:              version(),
		Commands:             commands,
		EnableBashCompletion: true,
		HideVersion:          true,
		// Errors are printed once, by main, with their hint and exit code.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError:   usageErrorHandler,
		CommandNotFound: func(c *cli.Context, name string) {
			os.Exit(report(c.App.ErrWriter, usagef("unknown command %q", name)))
		},
	}
}

// usageErrorHandler turns a command-line mistake (an unknown flag, a bad value) into a
// usage error that main prints on one line with a hint, where urfave/cli would print
// the whole help of the command.
func usageErrorHandler(_ *cli.Context, err error, _ bool) error { return usageError(err) }

// oneLineUsageErrors installs usageErrorHandler on every command and subcommand.
func oneLineUsageErrors(cmds []*cli.Command) {
	for _, c := range cmds {
		c.OnUsageError = usageErrorHandler
		oneLineUsageErrors(c.Subcommands)
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newApp().RunContext(ctx, os.Args)
	stop()
	os.Exit(report(os.Stderr, err))
}
