package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/node"
)

type rotateOptions struct {
	keystore, control string
	force             bool
	out               io.Writer
}

func init() {
	register(&cli.Command{
		Name:    "rotate-encryption-keys",
		Aliases: []string{"rotate_encryption_keys"},
		Usage:   "replace the master key, rewrapping every drive's data key online",
		Description: "Generates a new master key and, drive by drive, adds a keyslot wrapped by it, verifies it\n" +
			"and wipes the old one; then replaces master.key. The data keys do not change, so served\n" +
			"volumes stay online. Crash-safe: a rerun resumes an interrupted rotation. A registered\n" +
			"drive that is missing makes it refuse, unless --force, which leaves that drive stale:\n" +
			"locked to the old master key for good. Runs in the daemon when it serves the keystore.",
		Flags: []cli.Flag{
			keystoreFlag(),
			controlFlag(),
			&cli.BoolFlag{Name: "force", Usage: "rotate even if drives are missing; they become stale, locked to the old key for good"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return usagef("rotate-encryption-keys takes no arguments")
			}
			return runRotate(c.Context, rotateOptions{keystore: c.String("keystore"), control: c.String("control"), force: c.Bool("force"), out: c.App.Writer})
		},
	})
}

func runRotate(ctx context.Context, o rotateOptions) error {
	svc, daemon, done, err := service(ctx, o.keystore, o.control)
	if err != nil {
		return err
	}
	defer done()
	req := node.RotateRequest{Force: o.force}
	if !daemon {
		// In this process: progress on a terminal, and the crash points of the tests.
		req.Step = func(s keystore.Step) {
			rotateProgress(o.out, s)
			crashPoint(s.Name)
		}
	} else {
		progressf(o.out, "The daemon runs the rotation")
	}
	res, err := svc.Rotate(ctx, req)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return fail(exitcodes.Failure, err, "rerun 'atrest rotate-encryption-keys' to finish it")
		}
		if errors.Is(err, node.ErrRotationRunning) {
			return fail(exitcodes.Busy, err, "wait for it to finish: 'atrest encryption-status' shows its progress")
		}
		return keystoreError(err)
	}
	fmt.Fprintf(o.out, "Master key: %s\n", res.MasterKeyID)
	for _, d := range res.StaleDrives {
		fmt.Fprintf(o.out, "Drive %s (volume %s) is stale: locked to old key %s for good\n", d.UUID, d.Volume, d.KeyID)
	}
	fmt.Fprintln(o.out, "Key rotation complete")
	return nil
}

// rotateProgress prints a rotation step on a terminal.
func rotateProgress(w io.Writer, s keystore.Step) {
	drive := func() string {
		return fmt.Sprintf("drive %d/%d (%s, volume %s, %s)", s.Index, s.Total, s.Drive.UUID, s.Drive.Volume, s.Drive.Path)
	}
	switch s.Name {
	case keystore.StepResume:
		progressf(w, "Resuming the key rotation recorded in the journal")
	case keystore.StepNextKeyWritten:
		progressf(w, "New master key written to master.key.next")
	case keystore.StepJournal:
		progressf(w, "Rotation journal recorded")
	case keystore.StepDriveStart:
		progressf(w, "%s: rewrapping", drive())
	case keystore.StepDriveAdded:
		progressf(w, "%s: new keyslot written", drive())
	case keystore.StepDriveVerified:
		progressf(w, "%s: new keyslot verified", drive())
	case keystore.StepDriveWiped:
		progressf(w, "%s: old keyslot wiped", drive())
	case keystore.StepDriveDone:
		progressf(w, "%s: done", drive())
	case keystore.StepDriveAbsent:
		progressf(w, "Drive %s (volume %s) is missing: left locked to the old master key (--force), stale from now on", s.Drive.UUID, s.Drive.Volume)
	case keystore.StepCommit:
		progressf(w, "Every drive rewrapped")
	case keystore.StepOldKeyDestroy:
		progressf(w, "Old master key overwritten")
	case keystore.StepKeyReplaced:
		progressf(w, "master.key replaced")
	}
}
