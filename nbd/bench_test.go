package nbd

import (
	"context"
	"fmt"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// BenchmarkRoundTrip measures requests through atrest's client and server over a unix
// socket on a memory device: one caller (latency bound) and many (pipelined).
func BenchmarkRoundTrip(b *testing.B) {
	const size = 256 << 20
	ts := startServer(b, ServerConfig{Logf: func(string, ...any) {}}, Export{Device: blockdev.NewMem(size)})
	for _, conns := range []int{1, 4} {
		c, err := Dial(context.Background(), ts.addr, ClientOptions{Connections: conns, ReplayBytes: -1})
		if err != nil {
			b.Fatal(err)
		}
		for _, bs := range []int{4 << 10, 1 << 20} {
			for _, op := range []string{"read", "write"} {
				for _, par := range []bool{false, true} {
					name := fmt.Sprintf("%s/%dK/conns=%d/parallel=%v", op, bs>>10, conns, par)
					b.Run(name, func(b *testing.B) {
						b.SetBytes(int64(bs))
						b.ReportAllocs()
						do := func(buf []byte, i int) {
							off := int64(i*bs) % (size - int64(bs))
							var err error
							if op == "read" {
								_, err = c.ReadAt(buf, off)
							} else {
								_, err = c.WriteAt(buf, off)
							}
							if err != nil {
								b.Fatal(err)
							}
						}
						if !par {
							buf := make([]byte, bs)
							for i := 0; b.Loop(); i++ {
								do(buf, i)
							}
							return
						}
						b.SetParallelism(16)
						b.RunParallel(func(pb *testing.PB) {
							buf := make([]byte, bs)
							for i := 0; pb.Next(); i++ {
								do(buf, i)
							}
						})
					})
				}
			}
		}
		c.Close()
	}
}
