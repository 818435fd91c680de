package nbd

import (
	"context"
	"testing"
	"time"
)

func TestSemaphore(t *testing.T) {
	checkLeaks(t)
	s := newSemaphore(10)
	ctx := context.Background()
	if err := s.acquire(ctx, 7); err != nil {
		t.Fatal(err)
	}
	// A large waiter blocks the small ones behind it (FIFO, no starvation).
	got := make(chan int64, 3)
	go func() { s.acquire(ctx, 8); got <- 8 }()
	time.Sleep(10 * time.Millisecond)
	go func() { s.acquire(ctx, 1); got <- 1 }()
	// A cancelled waiter leaves the queue and takes nothing.
	cctx, cancel := context.WithCancel(ctx)
	cancelled := make(chan error, 1)
	go func() { cancelled <- s.acquire(cctx, 2) }()
	time.Sleep(10 * time.Millisecond)
	cancel()
	if err := <-cancelled; err == nil {
		t.Fatal("cancelled acquire succeeded")
	}
	select {
	case n := <-got:
		t.Fatalf("acquire of %d succeeded while 7 of 10 are held and 8 waits first", n)
	case <-time.After(20 * time.Millisecond):
	}
	s.release(7)
	if a, b := <-got, <-got; a+b != 9 {
		t.Fatalf("got %d and %d", a, b)
	}
	s.release(9)
	if s.cur != 0 || len(s.waiters) != 0 {
		t.Fatalf("cur %d, %d waiters", s.cur, len(s.waiters))
	}
}

func TestBufPool(t *testing.T) {
	for _, n := range []int{0, 1, 4096, 4097, 1 << 20, 32 << 20, 64<<20 + 1} {
		b := getBuf(n)
		if len(*b) != n {
			t.Fatalf("getBuf(%d) has length %d", n, len(*b))
		}
		putBuf(b)
	}
}
