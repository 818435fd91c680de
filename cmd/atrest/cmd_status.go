package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/node"
)

type statusOptions struct {
	keystore, control string
	json              bool
	out               io.Writer
}

func init() {
	register(&cli.Command{
		Name:    "encryption-status",
		Aliases: []string{"encryption_status"},
		Usage:   "report the encryption of the cluster: master key, last rotation, drives",
		Description: "Asks the daemon when it serves the keystore (it then also says which drives it sees\n" +
			"and which volumes it exports), or reads the keystore and checks every drive itself.",
		Flags: []cli.Flag{keystoreFlag(), controlFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON (schema in docs/status.md)"}},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return usagef("encryption-status takes no arguments")
			}
			return runStatus(c.Context, statusOptions{keystore: c.String("keystore"), control: c.String("control"), json: c.Bool("json"), out: c.App.Writer})
		},
	})
}

func runStatus(ctx context.Context, o statusOptions) error {
	svc, _, done, err := service(ctx, o.keystore, o.control)
	if err != nil {
		return err
	}
	defer done()
	st, err := svc.Status(ctx)
	if err != nil {
		return keystoreError(err)
	}
	return printStatus(o.out, st, o.json)
}

// printStatus prints the status, as text or JSON: the same whether the daemon or the
// keystore answered.
func printStatus(w io.Writer, st *node.Status, asJSON bool) error {
	if asJSON {
		b, _ := json.MarshalIndent(st, "", "  ")
		_, err := fmt.Fprintf(w, "%s\n", b)
		return err
	}
	yes := map[bool]string{true: "yes", false: "no"}
	tw := tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
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
	served := "no (read from the keystore and the drives)"
	if st.Serving {
		served = "yes (the daemon answered)"
	}
	fmt.Fprintf(tw, "Served:\t%s\n", served)
	fmt.Fprintf(tw, "Volumes:\t%d\n", len(st.Volumes))
	fmt.Fprintf(tw, "Drives:\t%d\n", len(st.Drives))
	tw.Flush()
	if len(st.Volumes) > 0 {
		tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "  VOLUME\tLAYOUT\tSTATE\tMEMBERS\tEXPORTS")
		for _, v := range st.Volumes {
			exports := "-"
			if len(v.Exports) > 0 {
				exports = fmt.Sprintf("%q", v.Exports)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%s\n", v.Name, v.Layout, v.State, len(v.Members), exports)
		}
		tw.Flush()
	}
	if len(st.Drives) > 0 {
		if err := printDrives(w, st.Drives, "  "); err != nil {
			return err
		}
	}
	for _, a := range st.Advice {
		fmt.Fprintf(w, "Advice: %s\n", a)
	}
	return nil
}

// printDrives prints drives as a table, then what is known of those not present.
func printDrives(w io.Writer, drives []node.DriveStatus, indent string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "%sUUID\tVOLUME\tMEMBER\tSECTOR\tSTATE\tKEY ID\tPATH\n", indent)
	for _, d := range drives {
		fmt.Fprintf(tw, "%s%s\t%s\t%d/%d\t%d\t%s\t%s\t%s\n", indent, d.UUID, d.Volume, d.MemberIndex+1, d.MemberCount, d.SectorSize, d.State, d.KeyID, d.Path)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, d := range drives {
		switch {
		case d.Detail != "" && d.Hint != "":
			fmt.Fprintf(w, "%s%s: %s (%s)\n", indent, d.UUID, d.Detail, d.Hint)
		case d.Detail != "" || d.Hint != "":
			fmt.Fprintf(w, "%s%s: %s%s\n", indent, d.UUID, d.Detail, d.Hint)
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
