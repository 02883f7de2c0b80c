package container

import (
	"sync"
	"time"
)

// ring is a bounded console buffer: the newest size bytes of a container's
// output in a fixed circular buffer (a write copies only its own bytes),
// with followers woken once per write that has anybody waiting.
type ring struct {
	mu      sync.Mutex
	buf     []byte
	total   int64 // bytes ever written; followers track their offset in it
	wake    chan struct{}
	waiting bool // somebody holds wake
}

func newRing(size int) *ring { return &ring{buf: make([]byte, size), wake: make(chan struct{})} }

func (r *ring) Write(p []byte) (int, error) {
	n := len(p)
	if len(p) > len(r.buf) {
		p = p[len(p)-len(r.buf):]
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	size := int64(len(r.buf))
	// Bytes before p that were never stored (p longer than the ring).
	r.total += int64(n - len(p))
	at := int(r.total % size)
	c := copy(r.buf[at:], p)
	copy(r.buf, p[c:])
	r.total += int64(len(p))
	if r.waiting {
		close(r.wake)
		r.wake = make(chan struct{})
		r.waiting = false
	}
	return n, nil
}

// snapshot returns the buffered bytes from offset off (clamped to what is
// still held), the new offset, and a channel closed on the next write.
func (r *ring) snapshot(off int64) ([]byte, int64, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	size := int64(len(r.buf))
	start := max(r.total-size, 0)
	if off < start {
		off = start
	}
	out := make([]byte, 0, r.total-off)
	for off < r.total {
		at := off % size
		end := min(size, at+(r.total-off))
		out = append(out, r.buf[at:end]...)
		off += end - at
	}
	r.waiting = true
	return out, r.total, r.wake
}

// limiter is a token bucket of bytes per second: the console reader takes
// tokens for what it read and sleeps when there are none, so a container
// that floods its console is slowed by its own full pipe instead of making
// cmld spend its CPU on it.
type limiter struct {
	rate   float64 // bytes per second
	burst  float64
	tokens float64
	last   time.Time
	sleep  func(time.Duration)
}

func newLimiter(rate, burst int) *limiter {
	return &limiter{rate: float64(rate), burst: float64(burst), tokens: float64(burst), last: time.Now(), sleep: time.Sleep}
}

// take accounts for n bytes, sleeping as long as the bucket is in debt.
func (l *limiter) take(n int) {
	now := time.Now()
	if elapsed := now.Sub(l.last); elapsed > 0 {
		l.tokens = min(l.burst, l.tokens+elapsed.Seconds()*l.rate)
		l.last = now
	}
	l.tokens -= float64(n)
	if l.tokens < 0 {
		// Sleeping pays the debt.
		d := time.Duration(-l.tokens / l.rate * float64(time.Second))
		l.sleep(d)
		l.tokens = 0
		l.last = now.Add(d)
	}
}
