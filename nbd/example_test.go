package nbd_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/nbd"
)

// Serve a device on a unix socket and read it back through the client.
func ExampleServer() {
	dir, err := os.MkdirTemp("", "nbd-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "nbd.sock")

	dev := blockdev.NewMem(1 << 20)
	dev.WriteAt([]byte("hello over NBD"), 4096)
	srv := nbd.NewServer(nbd.ServerConfig{})
	if err := srv.AddExport(nbd.Export{Name: "vol", Device: dev}); err != nil {
		log.Fatal(err)
	}
	l, err := nbd.Listen("unix:" + sock)
	if err != nil {
		log.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), l) }()

	c, err := nbd.Dial(context.Background(), "nbd+unix:///vol?socket="+sock, nbd.ClientOptions{})
	if err != nil {
		log.Fatal(err)
	}
	buf := make([]byte, 14)
	if _, err := c.ReadAt(buf, 4096); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d bytes; at 4096: %q\n", c.Size(), buf)
	c.Close()

	// Shutdown drains and flushes the exports; the devices stay the caller's to close.
	if err := srv.Shutdown(context.Background()); err != nil {
		log.Fatal(err)
	}
	<-served
	dev.Close()
	// Output:
	// 1048576 bytes; at 4096: "hello over NBD"
}
