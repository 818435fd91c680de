package nbd

import (
	"bytes"
	"context"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

func TestClientServerRoundTrip(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, Export{Name: "", Device: blockdev.NewMem(8 << 20)})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p := pattern(1<<20, 3)
	if _, err := c.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := c.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Fatal("read back differs")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", c.Info())
}
