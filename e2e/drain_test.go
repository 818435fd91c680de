package e2e

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// NBD protocol constants
// (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md: "Newstyle
// negotiation", "Request message", "Simple reply message").
const (
	nbdMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic       = 0x49484156454F5054 // "IHAVEOPT"
	nbdFixedNewstyle  = 1 << 0             // handshake and client flag
	nbdNoZeroes       = 1 << 1             // handshake and client flag
	nbdOptExportName  = 1
	nbdRequestMagic   = 0x25609513
	nbdSimpleReply    = 0x67446698
	nbdCmdRead        = 0
	nbdCmdWriteZeroes = 6
	nbdFlagNoHole     = 1 << 1
	nbdRequestHdrLen  = 28
	nbdSimpleReplyLen = 16
)

// rawConnect opens a bare NBD connection to an export with NBD_OPT_EXPORT_NAME, for
// what the project's client does not do on purpose: send requests without reading
// their replies.
func rawConnect(t *testing.T, sock, export string) net.Conn {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	var hello [18]byte
	if _, err := io.ReadFull(nc, hello[:]); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != nbdOptMagic ||
		binary.BigEndian.Uint16(hello[16:])&(nbdFixedNewstyle|nbdNoZeroes) != nbdFixedNewstyle|nbdNoZeroes {
		t.Fatalf("unexpected server greeting %x", hello)
	}
	msg := binary.BigEndian.AppendUint32(nil, nbdFixedNewstyle|nbdNoZeroes)
	msg = binary.BigEndian.AppendUint64(msg, nbdOptMagic)
	msg = binary.BigEndian.AppendUint32(msg, nbdOptExportName)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	if _, err := nc.Write(msg); err != nil {
		t.Fatal(err)
	}
	var info [10]byte // size, transmission flags; no zeroes
	if _, err := io.ReadFull(nc, info[:]); err != nil {
		t.Fatalf("export %q: %v", export, err)
	}
	return nc
}

// TestServeSIGTERMDrains pipelines 56 zero writes of 1 MiB and a small read on one
// connection without reading the replies, waits for the read's reply (so the daemon
// has read every zero write before it: one reader per connection, in order) and sends
// SIGTERM at once, while the daemon still encrypts a backlog of zeroes; only then does
// it read the other replies. A drain means that every request the daemon read is
// answered before the connection closes; so after a restart a block holds zeroes if and
// only if its request was answered. One that landed without an answer is a connection
// cut, not a drain (what `atrest serve` did when it passed the signal's context to
// Serve).
func TestServeSIGTERMDrains(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	img := c.format("vol", "80M") // a 64 MiB export
	d := c.serve(img)

	const n, size = 56, 1 << 20
	// The blocks first hold data, so that zeroes that land are seen.
	cl := d.dial("vol")
	old := randomBytes(n*size, 99)
	if _, err := cl.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	cl.Close()

	nc := rawConnect(t, d.sock, "vol")
	var reqs []byte
	request := func(flags, typ uint16, cookie, off uint64, n uint32) {
		reqs = binary.BigEndian.AppendUint32(reqs, nbdRequestMagic)
		reqs = binary.BigEndian.AppendUint16(reqs, flags)
		reqs = binary.BigEndian.AppendUint16(reqs, typ)
		reqs = binary.BigEndian.AppendUint64(reqs, cookie)
		reqs = binary.BigEndian.AppendUint64(reqs, off)
		reqs = binary.BigEndian.AppendUint32(reqs, n)
	}
	for i := range n {
		request(nbdFlagNoHole, nbdCmdWriteZeroes, uint64(i), uint64(i)*size, size)
	}
	const readCookie, readLen = n, 512
	request(0, nbdCmdRead, readCookie, 63<<20, readLen)
	if _, err := nc.Write(reqs); err != nil {
		t.Fatalf("send the requests: %v", err)
	}

	answered := map[uint64]bool{}
	var start time.Time
	nc.SetReadDeadline(time.Now().Add(60 * time.Second))
	for {
		var r [nbdSimpleReplyLen]byte
		if _, err := io.ReadFull(nc, r[:]); err != nil {
			// The end: EOF, or ECONNRESET when the daemon closed with requests of ours
			// still unread (Linux reports it once the replies before it are read).
			if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("reading replies: %v", err)
			}
			break
		}
		cookie := binary.BigEndian.Uint64(r[8:])
		if binary.BigEndian.Uint32(r[0:]) != nbdSimpleReply || binary.BigEndian.Uint32(r[4:]) != 0 || cookie > readCookie {
			t.Fatalf("unexpected reply %x", r)
		}
		if cookie == readCookie {
			if _, err := io.ReadFull(nc, make([]byte, readLen)); err != nil {
				t.Fatal(err)
			}
			start = d.term()
			continue
		}
		answered[cookie] = true
	}
	if start.IsZero() {
		t.Fatal("no reply to the read")
	}
	d.stopped()
	t.Logf("%d of %d zero writes answered; SIGTERM to exit %v", len(answered), n, time.Since(start).Round(time.Millisecond))
	if len(answered) != n {
		t.Errorf("the daemon had read all %d zero writes before SIGTERM but answered %d", n, len(answered))
	}

	d = c.serve(img)
	cl = d.dial("vol")
	buf := make([]byte, size)
	zero := make([]byte, size)
	for i := range n {
		if _, err := cl.ReadAt(buf, int64(i)*size); err != nil {
			t.Fatal(err)
		}
		landed := bytes.Equal(buf, zero)
		switch {
		case answered[uint64(i)] && !landed:
			t.Errorf("zero write %d was answered but the block does not read zeroes", i)
		case !answered[uint64(i)] && landed:
			t.Errorf("zero write %d landed on the drive but was never answered: the daemon cut the connection instead of draining", i)
		case !landed && !bytes.Equal(buf, old[i*size:][:size]):
			t.Errorf("block %d is neither its old data nor zeroes", i)
		}
	}
	cl.Close()
	d.stop()
}
