package discovery_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"

	"github.com/atrest/atrest/discovery"
)

// A node scans once at start-up, then follows the changes.
func Example() {
	s, err := discovery.New(discovery.Options{
		Sources: discovery.Sources{
			Patterns: discovery.DefaultPatterns(),
			Paths:    []string{"/srv/atrest/drive0.img"}, // where the registry last saw its drives
			Dirs:     []string{"/srv/atrest"},            // and the directories of its image files
		},
		Logger: slog.Default(),
	})
	if err != nil {
		log.Fatal(err)
	}
	snap, err := s.Scan(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range snap.Candidates {
		switch {
		case c.Duplicate:
			fmt.Printf("%s: drive %s seen twice, using neither\n", c.Path, c.UUID)
		case c.Token != nil:
			fmt.Printf("%s: drive %s, member %d of volume %s\n", c.Path, c.UUID, c.Token.MemberIndex, c.Token.Volume)
		}
	}

	w, err := s.Watch(discovery.WatchOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()
	for u := range w.Updates() {
		for _, ch := range u.Changes {
			fmt.Printf("%s: %s (%s)\n", ch.Kind, ch.Candidate.Path, ch.Candidate.UUID)
		}
	}
}
