package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
)

type statusOptions struct {
	keystore string
	json     bool
	out      io.Writer
}

func init() {
	register(&cli.Command{
		Name:    "encryption-status",
		Aliases: []string{"encryption_status"},
		Usage:   "report the encryption of the cluster: master key, last rotation, drives",
		Flags:   []cli.Flag{keystoreFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON (schema in docs/luks2-profile.md)"}},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return usagef("encryption-status takes no arguments")
			}
			return runStatus(c.Context, statusOptions{keystore: c.String("keystore"), json: c.Bool("json"), out: c.App.Writer})
		},
	})
}

func runStatus(ctx context.Context, o statusOptions) error {
	k, r, err := openOffline(ctx, o.keystore)
	if err != nil {
		return keystoreError(err)
	}
	st, err := offlineStatus(k, r)
	if err != nil {
		return keystoreError(err)
	}
	if o.json {
		b, _ := json.MarshalIndent(st, "", "  ")
		_, err := fmt.Fprintf(o.out, "%s\n", b)
		return err
	}
	yes := map[bool]string{true: "yes", false: "no"}
	tw := tabwriter.NewWriter(o.out, 0, 8, 1, ' ', 0)
	fmt.Fprintf(tw, "Data Encrypted:\t%s\n", yes[st.DataEncrypted])
	fmt.Fprintf(tw, "Encryption Type:\t%s, %s\n", st.Type, st.Cipher)
	fmt.Fprintf(tw, "Cluster UUID:\t%s\n", st.ClusterUUID)
	fmt.Fprintf(tw, "Master Key ID:\t%s\n", st.MasterKeyID)
	fmt.Fprintf(tw, "Master Key Created:\t%s (age %s)\n", st.MasterKeyCreated.UTC().Format(time.RFC3339), age(st.MasterKeyAge))
	last := "never"
	if st.LastRotation != nil {
		last = st.LastRotation.UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(tw, "Last Key Rotation:\t%s\n", last)
	rot := "no"
	if r := st.Rotation; r != nil {
		rot = fmt.Sprintf("yes (since %s, %d drive(s) done, %d left; rerun 'atrest rotate-encryption-keys' if it is not running)",
			r.Started.UTC().Format(time.RFC3339), r.DrivesDone, r.DrivesLeft)
	}
	fmt.Fprintf(tw, "Key Rotation In Progress:\t%s\n", rot)
	fmt.Fprintf(tw, "Drives:\t%d\n", len(st.Drives))
	tw.Flush()
	if len(st.Drives) == 0 {
		return nil
	}
	tw = tabwriter.NewWriter(o.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "  UUID\tVOLUME\tSTATE\tKEY ID\tPATH")
	for _, d := range st.Drives {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", d.UUID, d.Volume, d.State, d.KeyID, d.Path)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, d := range st.Drives {
		if d.Detail != "" {
			fmt.Fprintf(o.out, "  %s: %s\n", d.UUID, d.Detail)
		}
	}
	return nil
}

// age prints a duration in seconds as days and hours, hours and minutes, minutes and
// seconds, or seconds, whichever two units (or one) say it best.
func age(sec int64) string {
	d, h, m := sec/86400, sec%86400/3600, sec%3600/60
	switch {
	case d > 0:
		return fmt.Sprintf("%dd %dh", d, h)
	case h > 0:
		return fmt.Sprintf("%dh %dm", h, m)
	case m > 0:
		return fmt.Sprintf("%dm %ds", m, sec%60)
	default:
		return fmt.Sprintf("%ds", max(sec, 0))
	}
}
