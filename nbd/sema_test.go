package nbd

import (
	"context"
	"testing"
	"time"
)

// TestBudget: requests take from their connection's reserve first and borrow from the
// pool beyond it, within the connection's share; waiters for the pool are served in
// order; a connection that waits is woken by its own releases as well; a wait that is
// cancelled gives back what was granted meanwhile.
func TestBudget(t *testing.T) {
	checkLeaks(t)
	ctx := context.Background()
	p := newPool(8<<20, 100)
	a := newBudget(p, 7<<20, 50) // 1 MiB of reserve and 6 to borrow
	b := newBudget(p, 7<<20, 50)
	check := func(what string, poolBytes, aRes int64) {
		t.Helper()
		if got, _ := p.inUse(); got != poolBytes {
			t.Fatalf("%s: pool has %d bytes out, want %d", what, got, poolBytes)
		}
		if got, _ := a.inReserve(); got != aRes {
			t.Fatalf("%s: a's reserve has %d bytes out, want %d", what, got, aRes)
		}
	}

	// The reserve: 1 MiB and 16 requests.
	var small []hold
	for range reserveRequests {
		h := hold{4096, a.tryAcquire(4096)}
		if h.src != fromReserve {
			t.Fatalf("small request from %v, want the reserve", h.src)
		}
		small = append(small, h)
	}
	check("16 small requests", 0, 16*4096)
	if src := a.tryAcquire(0); src != fromPool {
		t.Fatalf("17th request from %v, want the pool", src)
	}
	a.release(hold{0, fromPool})
	for _, h := range small {
		a.release(h)
	}
	r1 := hold{reserveBytes, a.tryAcquire(reserveBytes)}
	if r1.src != fromReserve {
		t.Fatalf("1 MiB request from %v, want the reserve", r1.src)
	}
	if src := a.tryAcquire(1); src != fromPool {
		t.Fatalf("a byte beyond the reserve from %v, want the pool", src)
	}
	a.release(hold{1, fromPool})

	// The share: a holds 7 MiB at most (6 borrowed), although the pool has 8.
	p1 := hold{6 << 20, a.tryAcquire(6 << 20)}
	if p1.src != fromPool {
		t.Fatalf("6 MiB from %v, want the pool", p1.src)
	}
	check("reserve and share full", 6<<20, reserveBytes)
	if src := a.tryAcquire(1 << 20); src != fromNone {
		t.Fatalf("beyond the share: from %v", src)
	}
	// a waits for its own replies (it is beyond its share), without queueing for the
	// pool: b gets the rest of the pool meanwhile.
	gotA := make(chan source, 1)
	go func() { gotA <- a.acquire(ctx, 1<<20) }()
	waitFor(t, "a waiting", a.waiting.Load)
	take := func(x *budget, n int64, want source) hold {
		t.Helper()
		h := hold{n, x.tryAcquire(n)}
		if h.src != want {
			t.Fatalf("%d bytes from %v, want %v", n, h.src, want)
		}
		return h
	}
	rb := take(b, 1<<20, fromReserve)
	b1, b2 := take(b, 1<<20, fromPool), take(b, 1<<20, fromPool)
	check("pool full", 8<<20, 1<<20)
	a.release(r1) // a's reserve is free again: its waiter takes it
	if src := <-gotA; src != fromReserve {
		t.Fatalf("a's waiter got %v, want the reserve", src)
	}

	// Waiters for the pool are served in order: with the pool full, a asks for 2 MiB,
	// then b for 1 MiB; 1 MiB free lets nobody through (a is first), 2 MiB let a
	// through, and the next 1 MiB b.
	a.release(p1)
	p1 = take(a, 4<<20, fromPool)
	b3, b4 := take(b, 1<<20, fromPool), take(b, 1<<20, fromPool)
	check("pool full again", 8<<20, 1<<20)
	go func() { gotA <- a.acquire(ctx, 2<<20) }()
	waitFor(t, "a queued", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.waiters) == 1 })
	bctx, cancel := context.WithCancel(ctx)
	gotB := make(chan source, 1)
	go func() { gotB <- b.acquire(bctx, 1<<20) }()
	waitFor(t, "b queued", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.waiters) == 2 })
	b.release(b1)
	select {
	case src := <-gotB:
		t.Fatalf("b overtook a: %v", src)
	case src := <-gotA:
		t.Fatalf("a got %v with 1 MiB free", src)
	case <-time.After(20 * time.Millisecond):
	}
	b.release(b2)
	if src := <-gotA; src != fromPool {
		t.Fatalf("a got %v", src)
	}
	b.release(b3)
	if src := <-gotB; src != fromPool {
		t.Fatalf("b got %v", src)
	}
	// A wait beyond the share that is cancelled ends with nothing taken.
	go func() { gotB <- b.acquire(bctx, 5<<20) }()
	waitFor(t, "b waiting", b.waiting.Load)
	cancel()
	if src := <-gotB; src != fromNone {
		t.Fatalf("cancelled acquire got %v", src)
	}
	for _, h := range []hold{{2 << 20, fromPool}, p1, {1 << 20, fromReserve}} {
		a.release(h)
	}
	for _, h := range []hold{b4, {1 << 20, fromPool}, rb} {
		b.release(h)
	}
	check("all given back", 0, 0)
	if len(p.waiters) != 0 || p.freeReqs != 100 || a.reqs != 0 || b.reqs != 0 || b.bytes != 0 || b.res.Load() != 0 {
		t.Fatalf("waiters %d, free requests %d, a %d, b %d/%d/%d", len(p.waiters), p.freeReqs, a.reqs, b.reqs, b.bytes, b.res.Load())
	}

	// A waiter queued for the pool that its own reserve lets in first leaves the queue.
	r := take(a, 1<<20, fromReserve)
	p1 = take(a, 5<<20, fromPool)
	p2 := take(b, 3<<20, fromPool) // the pool is full, a is within its share
	go func() { gotA <- a.acquire(ctx, 4096) }()
	waitFor(t, "a queued", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.waiters) == 1 })
	a.release(r)
	if src := <-gotA; src != fromReserve {
		t.Fatalf("a got %v, want the reserve", src)
	}
	if len(p.waiters) != 0 || a.queued {
		t.Fatal("a is still queued")
	}
	for _, h := range []hold{{4096, fromReserve}, p1} {
		a.release(h)
	}
	b.release(p2)
	check("all given back again", 0, 0)
}

// waitFor polls cond for up to 10 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
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

// BenchmarkBudget measures what the reader pays per request to take its slot and bytes
// and the writer to give them back: from the reserve (a 4 KiB request) and from the
// pool (1 MiB, with the reserve in use).
func BenchmarkBudget(b *testing.B) {
	p := newPool(512<<20, 1024)
	c := newBudget(p, 128<<20, 128)
	b.Run("reserve", func(b *testing.B) {
		for b.Loop() {
			c.release(hold{4096, c.tryAcquire(4096)})
		}
	})
	b.Run("pool", func(b *testing.B) {
		r := hold{4096, c.tryAcquire(4096)}
		for b.Loop() {
			c.release(hold{1 << 20, c.tryAcquire(1 << 20)})
		}
		c.release(r)
	})
}
