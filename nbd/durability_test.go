package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

func makeFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "drive.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestKill9Durability: writes flushed through the server survive kill -9 of the server
// process (plain and encrypted); after a restart they read back.
func TestKill9Durability(t *testing.T) {
	key := make([]byte, 64)
	rand.Read(key)
	for _, encrypted := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "encrypted"}[encrypted], func(t *testing.T) {
			file := makeFile(t, 16<<20)
			sock := filepath.Join(shortDir(t), "s")
			env := []string{"NBD_TEST_FILE=" + file, "NBD_TEST_LISTEN=unix:" + sock}
			if encrypted {
				env = append(env, "NBD_TEST_KEY="+hex.EncodeToString(key))
			}
			h := startHelper(t, env, nil)
			c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{ReconnectTimeout: -1})
			if err != nil {
				t.Fatal(err)
			}
			data := pattern(4<<20, 1)
			if _, err := c.WriteAt(data, 1<<20); err != nil {
				t.Fatal(err)
			}
			fua := pattern(64<<10, 2)
			if _, err := c.WriteAtFUA(fua, 8<<20); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			_ = h.cmd.Process.Signal(syscall.SIGKILL)
			<-h.exited
			c.Close()

			// The server is gone; its socket file stays behind (stale). A new server
			// replaces it.
			startHelper(t, env, nil)
			c2, err := Dial(context.Background(), "unix:"+sock, ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer c2.Close()
			got := make([]byte, len(data))
			if _, err := c2.ReadAt(got, 1<<20); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("flushed data lost across kill -9")
			}
			got = got[:len(fua)]
			if _, err := c2.ReadAt(got, 8<<20); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, fua) {
				t.Fatal("FUA data lost across kill -9")
			}
			if encrypted {
				raw, _ := os.ReadFile(file)
				if bytes.Contains(raw, data[:4096]) {
					t.Fatal("plaintext on the drive")
				}
			}
		})
	}
}

// TestPowerCut serves a Faulty device (a volatile write cache): flushed and FUA writes
// survive a power cut, from several connections; an unflushed write is lost, which
// shows the test can tell.
func TestPowerCut(t *testing.T) {
	checkLeaks(t)
	f := blockdev.NewFaulty(blockdev.NewMem(16 << 20))
	ts := startServer(t, ServerConfig{}, Export{Device: f})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{Connections: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := c.Info().Connections; n != 4 {
		t.Fatalf("%d connections", n)
	}
	// Writes land on all four connections (round robin), then one flush.
	var flushed [][]byte
	for i := range 8 {
		p := pattern(256<<10, byte(10+i))
		if _, err := c.WriteAt(p, int64(i)<<20); err != nil {
			t.Fatal(err)
		}
		flushed = append(flushed, p)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	fua := pattern(4096, 77)
	if _, err := c.WriteAtFUA(fua, 12<<20); err != nil {
		t.Fatal(err)
	}
	lost := pattern(4096, 88)
	if _, err := c.WriteAt(lost, 13<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 256<<10)
	for i, p := range flushed {
		f.ReadAt(got, int64(i)<<20)
		if !bytes.Equal(got, p) {
			t.Fatalf("flushed write %d lost in the power cut", i)
		}
	}
	f.ReadAt(got[:4096], 12<<20)
	if !bytes.Equal(got[:4096], fua) {
		t.Fatal("FUA write lost in the power cut")
	}
	f.ReadAt(got[:4096], 13<<20)
	if bytes.Equal(got[:4096], lost) {
		t.Fatal("an unflushed write survived the power cut: the test cannot tell")
	}
}

// TestSystemdActivation passes a listening socket as systemd does (LISTEN_FDS,
// LISTEN_PID, descriptor 3), waits for READY=1 on NOTIFY_SOCKET, serves a client, and
// stops on SIGTERM with STOPPING=1.
func TestSystemdActivation(t *testing.T) {
	file := makeFile(t, 1<<20)
	sock := filepath.Join(shortDir(t), "activated.sock")
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, err := l.(interface{ File() (*os.File, error) }).File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	h := startHelper(t, []string{"NBD_TEST_FILE=" + file, "LISTEN_FDS=1", "LISTEN_FDNAMES=nbd"},
		[]*os.File{lf}, "/bin/sh", "-c", `LISTEN_PID=$$ exec "$@"`, "sh")
	c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt([]byte("activated"), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	h.expect(t, "STOPPING=1")
	select {
	case <-h.exited:
		if h.err != nil {
			t.Fatalf("server exit: %v", h.err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("server did not stop on SIGTERM")
	}
	b, _ := os.ReadFile(file)
	if string(b[:9]) != "activated" {
		t.Fatal("write not on the drive")
	}
}
