package container

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"
)

// The ring keeps exactly the newest bytes, whatever the write sizes, and
// a follower sees every byte once in order while it keeps up.
func TestRingKeepsNewestBytes(t *testing.T) {
	r := newRing(1000)
	var all bytes.Buffer
	rnd := rand.New(rand.NewPCG(3, 4))
	var off int64
	var seen bytes.Buffer
	for i := 0; i < 500; i++ {
		p := bytes.Repeat([]byte{byte('a' + i%26)}, rnd.IntN(400))
		if i%50 == 0 {
			p = bytes.Repeat([]byte("X"), 2500) // longer than the ring
		}
		r.Write(p)
		all.Write(p)
		if len(p) < 1000 {
			b, next, _ := r.snapshot(off)
			if int64(len(b)) != next-max(off, next-1000) {
				t.Fatalf("write %d: snapshot of %d bytes from %d to %d", i, len(b), off, next)
			}
			seen.Write(b)
			off = next
		} else {
			_, off, _ = r.snapshot(off) // the follower fell behind; skip
			seen.Reset()
		}
	}
	want := all.Bytes()[all.Len()-1000:]
	got, _, _ := r.snapshot(0)
	if !bytes.Equal(got, want) {
		t.Fatal("ring does not hold the newest 1000 bytes")
	}
}

// Writes wake a follower only when one waits; the limiter makes the
// reader sleep for what exceeds the rate.
func TestWakeAndLimit(t *testing.T) {
	r := newRing(64)
	_, _, wake := r.snapshot(0)
	r.Write([]byte("x"))
	select {
	case <-wake:
	default:
		t.Fatal("waiting follower not woken")
	}
	ch := r.wake
	r.Write([]byte("y")) // nobody waits: no new channel
	if r.wake != ch {
		t.Error("a write without followers replaced the wake channel")
	}

	var slept time.Duration
	l := newLimiter(1000, 1000)
	l.sleep = func(d time.Duration) { slept += d }
	for i := 0; i < 10; i++ {
		l.take(500) // 5000 bytes at 1000 B/s with a burst of 1000
	}
	if slept < 3500*time.Millisecond || slept > 4100*time.Millisecond {
		t.Errorf("slept %v for 4000 bytes over the burst at 1000 B/s", slept)
	}
}
