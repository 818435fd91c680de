package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/urfave/cli/v2"
)

// releaseVersion is set at link time for releases (-ldflags "-X main.releaseVersion=v1.2.3").
var releaseVersion = "dev"

func init() {
	register(&cli.Command{
		Name:  "version",
		Usage: "print the version of atrest and how it was built",
		Action: func(c *cli.Context) error {
			_, err := fmt.Fprintf(c.App.Writer, "atrest %s\n", version())
			return err
		},
	})
}

// version is the release version, with the VCS revision the binary was built from.
func version() string {
	v := releaseVersion
	if info, ok := debug.ReadBuildInfo(); ok {
		rev, dirty := "", ""
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					dirty = "+dirty"
				}
			}
		}
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if rev != "" {
			v += " (" + rev + dirty + ")"
		}
	}
	return fmt.Sprintf("%s %s %s/%s", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
