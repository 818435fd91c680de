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
	ts := startServer(b, ServerConfig{Logger: discardLogger}, Export{Device: blockdev.NewMem(size)})
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

// BenchmarkClientReplayLog measures what the replay log (a copy of every write until the
// next Flush, and a Flush of its own whenever ReplayBytes are held) costs 1 MiB writes
// from 4 writers: without the log, with the default 64 MiB, and with 512 MiB (8 times
// fewer flushes of its own).
func BenchmarkClientReplayLog(b *testing.B) {
	const size = 256 << 20
	ts := startServer(b, ServerConfig{Logger: discardLogger}, Export{Device: blockdev.NewMem(size)})
	for _, replay := range []int64{-1, 64 << 20, 512 << 20} {
		b.Run(fmt.Sprintf("log=%dMiB", max(replay, 0)>>20), func(b *testing.B) {
			c, err := Dial(context.Background(), ts.addr, ClientOptions{ReplayBytes: replay})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			b.SetBytes(1 << 20)
			b.ReportAllocs()
			b.SetParallelism(2) // 4 writers on 2 CPUs
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 1<<20)
				for i := 0; pb.Next(); i++ {
					if _, err := c.WriteAt(buf, int64(i%200)<<20); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
