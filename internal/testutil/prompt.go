package testutil

import (
	"testing"
	"time"
)

// Prompt checks that attempt, something a client does (a read, a connection), is answered
// within limit: it runs attempt until one run takes at most limit, three runs at most.
// A run that ends later is taken for load from other tests on the machine and tried
// again; a run that fails, that has not ended after 20 s (starved: Prompt calls
// unblock then, which must end it), or three slow runs fail the test.
func Prompt(t testing.TB, what string, limit time.Duration, unblock func(), attempt func() error) {
	t.Helper()
	var took []time.Duration
	for range 3 {
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- attempt() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(20 * time.Second):
			unblock()
			<-done
			t.Fatalf("%s: no answer after 20 s", what)
		}
		d := time.Since(start)
		if d <= limit {
			t.Logf("%s: %v", what, d)
			return
		}
		took = append(took, d)
	}
	t.Fatalf("%s: took %v, more than %v each time", what, took, limit)
}
