package container

import (
	"sync"
)

// ring is a bounded console buffer: the newest size bytes of a container's
// output, with followers woken on each write.
type ring struct {
	mu    sync.Mutex
	buf   []byte
	size  int
	total int64 // bytes ever written; followers track their offset in it
	wake  chan struct{}
}

func newRing(size int) *ring { return &ring{size: size, wake: make(chan struct{})} }

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.buf = append(r.buf, p...)
	if over := len(r.buf) - r.size; over > 0 {
		r.buf = append(r.buf[:0:0], r.buf[over:]...)
	}
	r.total += int64(len(p))
	close(r.wake)
	r.wake = make(chan struct{})
	r.mu.Unlock()
	return len(p), nil
}

// snapshot returns the buffered bytes from offset off (clamped to what is
// still held), the new offset, and a channel closed on the next write.
func (r *ring) snapshot(off int64) ([]byte, int64, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	start := r.total - int64(len(r.buf))
	if off < start {
		off = start
	}
	out := append([]byte(nil), r.buf[off-start:]...)
	return out, r.total, r.wake
}
