package nbd

import (
	"context"
	"math/bits"
	"sync"
)

// semaphore is a weighted semaphore with FIFO waiters and context cancellation. It bounds
// the bytes and the requests in flight, per connection and for the whole server.
type semaphore struct {
	mu      sync.Mutex
	size    int64
	cur     int64
	waiters []*semWaiter
}

type semWaiter struct {
	n     int64
	ready chan struct{}
}

func newSemaphore(size int64) *semaphore { return &semaphore{size: size} }

// acquire takes n units, waiting in FIFO order; it fails only when ctx is done.
func (s *semaphore) acquire(ctx context.Context, n int64) error {
	if n > s.size {
		panic("BUG: semaphore acquire larger than its size")
	}
	s.mu.Lock()
	if s.takeLocked(n) {
		s.mu.Unlock()
		return nil
	}
	w := &semWaiter{n: n, ready: make(chan struct{})}
	s.waiters = append(s.waiters, w)
	s.mu.Unlock()
	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		select {
		case <-w.ready:
			// Granted just now: give it back.
			s.cur -= n
			s.notifyLocked()
		default:
			for i, x := range s.waiters {
				if x == w {
					s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
					break
				}
			}
			// Removing the head may let the next waiters in.
			s.notifyLocked()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}

// tryAcquire takes n units if they are free now and nobody waits for them.
func (s *semaphore) tryAcquire(n int64) bool {
	if n > s.size {
		panic("BUG: semaphore acquire larger than its size")
	}
	s.mu.Lock()
	ok := s.takeLocked(n)
	s.mu.Unlock()
	return ok
}

// takeLocked takes n units if they are free now and nobody waits for them; s.mu is held.
func (s *semaphore) takeLocked(n int64) bool {
	if len(s.waiters) > 0 || s.size-s.cur < n {
		return false
	}
	s.cur += n
	return true
}

func (s *semaphore) release(n int64) {
	s.mu.Lock()
	s.cur -= n
	if s.cur < 0 {
		s.mu.Unlock()
		panic("BUG: semaphore released more than acquired")
	}
	s.notifyLocked()
	s.mu.Unlock()
}

func (s *semaphore) notifyLocked() {
	for len(s.waiters) > 0 {
		w := s.waiters[0]
		if s.size-s.cur < w.n {
			return
		}
		s.cur += w.n
		s.waiters = s.waiters[1:]
		close(w.ready)
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
