package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// fuzzServer serves small exports for the fuzz targets; the client side of a net.Pipe
// writes the fuzz input and drains what the server says.
func fuzzServer(f *testing.F) *Server { return fuzzServerT(f) }

func fuzzServerT(f testing.TB) *Server {
	s := NewServer(ServerConfig{HandshakeTimeout: time.Second, MaxRequestSize: 64 << 10})
	for _, e := range []Export{
		{Name: "", Device: blockdev.NewMem(1 << 20), VolumeID: fuzzVolume},
		{Name: "ro", Device: blockdev.NewMem(64 << 10), ReadOnly: true},
		{Name: "plain", Device: plainDev{blockdev.NewMem(64 << 10)}},
	} {
		if err := s.AddExport(e); err != nil {
			f.Fatal(err)
		}
	}
	return s
}

var fuzzVolume = VolumeID{0x61, 0x74, 15: 1}

// feed runs one connection with input as everything the client sends. The server must
// not panic (a panic fails the fuzz run), and must end the connection soon after the
// client goes away, with all its goroutines.
func feed(t *testing.T, s *Server, input []byte) {
	client, server := net.Pipe()
	served := make(chan struct{})
	go func() {
		s.ServeConn(context.Background(), server)
		close(served)
	}()
	drained := make(chan struct{})
	go func() {
		io.Copy(io.Discard, client)
		close(drained)
	}()
	_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = client.Write(input)
	client.Close()
	select {
	case <-served:
	case <-time.After(5 * time.Second):
		t.Fatalf("server still serving 5 s after the client left (input % x)", input)
	}
	<-drained
}

// handshakePrefix is what a client sends to enter transmission on the default export,
// with structured replies if asked.
func handshakePrefix(structured bool) []byte {
	var b bytes.Buffer
	b.Write(be32(clientFlagFixedNewstyle | clientFlagNoZeroes))
	if structured {
		b.Write(be64(magicIHaveOpt))
		b.Write(be32(optStructuredReply))
		b.Write(be32(0))
	}
	d := goData("", infoBlockSize)
	b.Write(be64(magicIHaveOpt))
	b.Write(be32(optGo))
	b.Write(be32(uint32(len(d))))
	b.Write(d)
	return b.Bytes()
}

func opt(o uint32, data []byte) []byte {
	return bytes.Join([][]byte{be64(magicIHaveOpt), be32(o), be32(uint32(len(data))), data}, nil)
}

func req(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
	h := make([]byte, requestHeaderLen)
	(&request{flags: flags, typ: typ, cookie: 0x1234, offset: off, length: length}).encode(h)
	return append(h, payload...)
}

func handshakeSeeds() [][]byte {
	cf := be32(clientFlagFixedNewstyle | clientFlagNoZeroes)
	cat := func(p ...[]byte) []byte { return bytes.Join(p, nil) }
	return [][]byte{
		handshakePrefix(false),
		handshakePrefix(true),
		cat(cf, opt(optList, nil), opt(optInfo, goData("ro", infoName, infoDescription)), opt(optAbort, nil)),
		cat(cf, opt(optExportName, []byte("plain")), req(cmdRead, 0, 0, 512, nil)),
		cat(be32(0), opt(optExportName, nil)),
		cat(be32(0xffff)),
		cat(cf, opt(optStartTLS, nil), opt(99, []byte("x")), opt(optGo, goData("nope"))),
		cat(cf, opt(optInfo, []byte{0, 0, 0, 200, 1, 2})),
		cat(cf, be64(magicIHaveOpt), be32(optGo), be32(0xffffffff)),
		cat(cf, opt(optStructuredReply, []byte{1}), opt(optStructuredReply, nil), opt(optStructuredReply, nil)),
		// atrest's extensions: a writer identity, the volume identity asked for, a write.
		cat(cf, opt(optAtrestClient, atrestClientOpt(1, 0, "fuzz")), opt(optGo, goData("", infoBlockSize, infoAtrestVolume)),
			req(cmdWrite, 0, 0, 4, []byte("abcd"))),
		cat(cf, opt(optAtrestClient, atrestClientOpt(2, atrestClientTakeOver, "")), opt(optExportName, nil)),
		cat(cf, opt(optAtrestClient, atrestClientOpt(3, atrestClientReadOnly, "ro")), opt(optInfo, goData("", infoAtrestVolume)),
			opt(optGo, goData("plain", infoAtrestVolume)), req(cmdWrite, 0, 0, 2, []byte("zz"))),
		cat(cf, opt(optAtrestClient, []byte{1}), opt(optAtrestClient, atrestClientOpt(0, 0, "zero id")),
			opt(optAtrestClient, atrestClientOpt(4, 0xff, "\x00\xff")), opt(optAtrestClient, atrestClientOpt(5, 0, "ok")),
			opt(optAtrestClient, atrestClientOpt(5, 0, "twice"))),
	}
}

// atrestClientOpt is the data of NBD_OPT_ATREST_CLIENT with writer id {id, 0...}.
func atrestClientOpt(id byte, flags uint32, desc string) []byte {
	d := make([]byte, writerIDLen, atrestClientFixedLen+len(desc))
	d[0] = id
	return append(binary.BigEndian.AppendUint32(d, flags), desc...)
}

func requestSeeds() [][]byte {
	cat := func(p ...[]byte) []byte { return bytes.Join(p, nil) }
	return [][]byte{
		cat([]byte{0}, req(cmdRead, 0, 0, 4096, nil), req(cmdDisc, 0, 0, 0, nil)),
		cat([]byte{1}, req(cmdWrite, cmdFlagFUA, 512, 8, []byte("abcdefgh")), req(cmdFlush, 0, 0, 0, nil),
			req(cmdRead, cmdFlagDF, 512, 8, nil)),
		cat([]byte{1}, req(cmdTrim, 0, 0, 4096, nil), req(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFastZero, 0, 1<<20, nil),
			req(cmdCache, 0, 0, 1<<20, nil)),
		cat([]byte{0}, req(cmdRead, 0, 1<<20-1, 2, nil), req(cmdWrite, 0, 1<<20-1, 2, []byte("zz")),
			req(cmdRead, 0, 0, 1<<30, nil), req(cmdWrite, 0, 0, 128<<10, make([]byte, 100))),
		cat([]byte{1}, req(42, 0xffff, 0, 0, nil), req(cmdBlockStatus, 0, 0, 1, nil), req(cmdRead, 0, 0, 0, nil)),
		cat([]byte{0}, req(cmdWrite, 0, 0, 1<<31, nil)),
		cat([]byte{1}, []byte{0x25, 0x60, 0x95, 0x14}, make([]byte, 24)),
		cat([]byte{0}, req(cmdWrite, 0, 0, 100, []byte("short"))),
	}
}

func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s)
	}
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, input []byte) { feed(t, s, input) })
}

func FuzzRequests(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s)
	}
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, input []byte) {
		structured := len(input) > 0 && input[0]&1 != 0
		if len(input) > 0 {
			input = input[1:]
		}
		feed(t, s, append(handshakePrefix(structured), input...))
	})
}

// TestFuzzSeedsLeakNothing runs every seed of both targets and checks that no
// goroutine is left; with NBD_WRITE_CORPUS=1 it also writes the seeds to
// testdata/fuzz, where `go test -fuzz` starts from them.
func TestFuzzSeedsLeakNothing(t *testing.T) {
	checkLeaks(t)
	s := fuzzServerT(t)
	for _, in := range handshakeSeeds() {
		feed(t, s, in)
	}
	for _, in := range requestSeeds() {
		feed(t, s, append(handshakePrefix(in[0]&1 != 0), in[1:]...))
	}
	if os.Getenv("NBD_WRITE_CORPUS") == "" {
		return
	}
	for name, seeds := range map[string][][]byte{"FuzzHandshake": handshakeSeeds(), "FuzzRequests": requestSeeds()} {
		dir := filepath.Join("testdata", "fuzz", name)
		os.MkdirAll(dir, 0o755)
		for i, in := range seeds {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", in)
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
