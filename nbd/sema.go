package nbd

import (
	"context"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
)

// Payload bytes and request slots. Memory and goroutines are bounded by what requests
// hold: each holds one request slot (a worker goroutine at most) and its payload bytes
// (a WRITE's payload or a READ's reply) from the moment the reader takes it until its
// reply is sent, or dropped with a broken connection.
//
// Every connection in transmission has a reserve of its own, reserveRequests slots and
// reserveBytes bytes, and borrows beyond it from the server's pool (MaxTotalRequests,
// MaxTotalBytes), as long as it stays within MaxConnRequests and MaxConnBytes in all. A
// request takes everything it needs from the reserve if it fits there, otherwise from
// the pool. So whatever the other clients do, a connection can always have a request of
// up to reserveBytes in flight once its own earlier ones are answered: a client that
// does not read its replies holds what it borrowed until the write timeout drops it
// (serverConn.writeOut), but it cannot take another connection's reserve. In all, the
// payload bytes in flight are at most MaxTotalBytes + MaxConns*reserveBytes (768 MiB
// with the defaults) and the requests MaxTotalRequests + MaxConns*reserveRequests (5120).
//
// The share of the pool is the fixed MaxConnBytes, not one that shrinks as more
// connections want the pool: borrowed units come back only when replies are sent, so a
// shrinking share would give a newcomer nothing from a client that keeps what it took;
// the reserve and the write timeout do. Waiters for the pool are served in order, one
// request of each connection at most (only the reader acquires), and nobody borrows
// past them, so that large requests are not starved by small ones.
//
// The reserve is counted in one atomic word per connection, so that the reader's common
// case, a small request, takes it without a lock; the pool has a mutex.
const (
	reserveRequests = 16
	reserveBytes    = 1 << 20
	resShift        = 40 // reserve word: slots << resShift | bytes
)

// source says where a request's slot and bytes came from.
type source uint8

const (
	fromNone    source = iota // nothing held
	fromReserve               // the connection's reserve
	fromPool                  // borrowed from the server's pool
)

// hold is what one request holds: a slot and bytes payload bytes, from src.
type hold struct {
	bytes int64
	src   source
}

// pool is the server's shared budget.
type pool struct {
	mu        sync.Mutex
	maxBytes  int64
	maxReqs   int64
	freeBytes int64
	freeReqs  int64
	waiters   []*budget // FIFO
}

func newPool(bytes, reqs int64) *pool {
	return &pool{maxBytes: bytes, maxReqs: reqs, freeBytes: bytes, freeReqs: reqs}
}

// inUse returns the bytes and slots borrowed now.
func (p *pool) inUse() (bytes, reqs int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.maxBytes - p.freeBytes, p.maxReqs - p.freeReqs
}

// grantLocked gives the waiters at the head of the queue what they wait for, as long
// as it is free. p.mu is held.
func (p *pool) grantLocked() {
	for len(p.waiters) > 0 {
		b := p.waiters[0]
		if p.freeReqs < 1 || p.freeBytes < b.want {
			return
		}
		p.freeReqs--
		p.freeBytes -= b.want
		b.reqs++
		b.bytes += b.want
		b.queued, b.granted = false, true
		p.waiters[0] = nil
		p.waiters = p.waiters[1:]
		b.signal()
	}
}

// budget is one connection's account: its reserve and what it borrowed from the pool.
// Only the connection's reader acquires; any goroutine releases.
type budget struct {
	pool     *pool
	maxBytes int64 // in all, reserve included
	maxReqs  int64
	resBytes int64 // reserve
	resReqs  int64

	res     atomic.Int64 // reserve in use: slots<<resShift | bytes
	waiting atomic.Bool  // the reader waits: releases signal wake
	wake    chan struct{}

	// Under pool.mu:
	bytes, reqs int64 // borrowed
	want        int64 // bytes asked for while queued
	queued      bool  // in pool.waiters
	granted     bool  // taken for it from the pool while queued
}

func newBudget(p *pool, maxBytes, maxReqs int64) *budget {
	return &budget{
		pool: p, maxBytes: maxBytes, maxReqs: maxReqs,
		resBytes: min(reserveBytes, maxBytes), resReqs: min(reserveRequests, maxReqs),
		wake: make(chan struct{}, 1),
	}
}

// inReserve returns the reserve's bytes and slots in use.
func (b *budget) inReserve() (bytes, reqs int64) {
	w := b.res.Load()
	return w & (1<<resShift - 1), w >> resShift
}

// tryReserve takes a slot and n bytes from the reserve if they fit. Only the reader
// adds to b.res, so what it saw free stays free until it adds.
func (b *budget) tryReserve(n int64) bool {
	bytes, reqs := b.inReserve()
	if reqs >= b.resReqs || bytes+n > b.resBytes {
		return false
	}
	b.res.Add(1<<resShift | n)
	return true
}

// borrowLocked takes a slot and n bytes from the pool if they are free, nobody waits
// for them and the connection stays within its share. pool.mu is held.
func (b *budget) borrowLocked(n int64) bool {
	p := b.pool
	if !b.shareAllows(n) || len(p.waiters) > 0 || p.freeReqs < 1 || p.freeBytes < n {
		return false
	}
	p.freeReqs--
	p.freeBytes -= n
	b.reqs++
	b.bytes += n
	return true
}

// shareAllows reports whether borrowing a slot and n bytes keeps the connection within
// its bounds, reserve included. pool.mu is held.
func (b *budget) shareAllows(n int64) bool {
	resBytes, resReqs := b.inReserve()
	return b.reqs+resReqs < b.maxReqs && b.bytes+resBytes+n <= b.maxBytes
}

// tryAcquire takes a slot and n bytes without waiting.
func (b *budget) tryAcquire(n int64) source {
	if b.tryReserve(n) {
		return fromReserve
	}
	b.pool.mu.Lock()
	ok := b.borrowLocked(n)
	b.pool.mu.Unlock()
	if ok {
		return fromPool
	}
	return fromNone
}

// acquire takes a slot and n bytes, waiting for the reserve (the connection's own
// replies to be sent) or for the pool, whichever comes first; it returns fromNone only
// when ctx ends.
func (b *budget) acquire(ctx context.Context, n int64) source {
	if s := b.tryAcquire(n); s != fromNone {
		return s
	}
	p := b.pool
	b.waiting.Store(true) // before looking again: a release after the look signals
	defer b.waiting.Store(false)
	for {
		if b.tryReserve(n) {
			p.mu.Lock()
			b.leaveLocked()
			p.mu.Unlock()
			return fromReserve
		}
		p.mu.Lock()
		if b.granted {
			b.granted = false
			p.mu.Unlock()
			return fromPool
		}
		if !b.queued && b.shareAllows(n) {
			if b.borrowLocked(n) {
				p.mu.Unlock()
				return fromPool
			}
			b.queued, b.want = true, n
			p.waiters = append(p.waiters, b)
		}
		p.mu.Unlock()
		select {
		case <-b.wake:
		case <-ctx.Done():
			p.mu.Lock()
			b.leaveLocked()
			p.mu.Unlock()
			return fromNone
		}
	}
}

// leaveLocked takes b out of the pool's queue, or gives back what the pool granted it
// meanwhile. pool.mu is held.
func (b *budget) leaveLocked() {
	p := b.pool
	switch {
	case b.granted:
		b.granted = false
		b.reqs--
		b.bytes -= b.want
		p.freeReqs++
		p.freeBytes += b.want
	case b.queued:
		b.queued = false
		for i, w := range p.waiters {
			if w == b {
				p.waiters = slices.Delete(p.waiters, i, i+1)
				break
			}
		}
	default:
		return
	}
	p.grantLocked() // the next waiters may fit now
}

// release gives back what a request held.
func (b *budget) release(h hold) {
	n := h.bytes
	switch h.src {
	case fromReserve:
		if b.res.Add(-(1<<resShift | n)) < 0 {
			panic("BUG: reserve released more than taken")
		}
	case fromPool:
		p := b.pool
		p.mu.Lock()
		b.reqs--
		b.bytes -= n
		if b.reqs < 0 || b.bytes < 0 {
			p.mu.Unlock()
			panic("BUG: pool released more than borrowed")
		}
		p.freeReqs++
		p.freeBytes += n
		p.grantLocked()
		p.mu.Unlock()
	default:
		panic("BUG: release of nothing")
	}
	if b.waiting.Load() {
		b.signal()
	}
}

// signal wakes the reader if it waits.
func (b *budget) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// Buffer pool: one sync.Pool per power-of-two size class from 4 KiB up to the largest
// request, so that request and reply payloads are reused instead of allocated.
const (
	minPoolShift = 12
	maxPoolShift = 26 // 64 MiB; larger buffers are allocated and dropped
)

var bufPools [maxPoolShift + 1]sync.Pool

func poolClass(n int) int {
	if n <= 1<<minPoolShift {
		return minPoolShift
	}
	return bits.Len(uint(n - 1))
}

// getBuf returns a buffer of length n from the pool. The pointer is what putBuf takes
// back, so that recycling a buffer allocates nothing.
func getBuf(n int) *[]byte {
	c := poolClass(n)
	if c > maxPoolShift {
		b := make([]byte, n)
		return &b
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<c)
	return &b
}

// putBuf returns a buffer obtained from getBuf; the caller no longer uses it.
func putBuf(p *[]byte) {
	c := cap(*p)
	if c == 0 || c&(c-1) != 0 {
		return
	}
	shift := bits.Len(uint(c)) - 1
	if shift < minPoolShift || shift > maxPoolShift {
		return
	}
	*p = (*p)[:c]
	bufPools[shift].Put(p)
}
