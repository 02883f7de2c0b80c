package audit

import (
	"sort"
	"sync"
	"time"
)

// Limiter bounds the records of one kind per key (a container) and
// second: the first PerSecond of each one-second window are recorded one
// by one, the rest only counted, for a summary record once the window has
// ended. Seccomp denials and denied network packets share it, so a flood
// in one container can neither fill the trail nor hide in it.
type Limiter struct {
	PerSecond int
	mu        sync.Mutex
	keys      map[string]*window
}

type window struct {
	start      time.Time
	n          int
	suppressed uint64
	label      string
}

// Suppressed is what a key's ended window counted without recording.
type Suppressed struct {
	Key, Label string
	N          uint64
}

// Allow reports whether one more record for key may be written at now;
// label (the container's name) goes with the key's summary.
func (l *Limiter) Allow(key, label string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil {
		l.keys = map[string]*window{}
	}
	w := l.keys[key]
	if w == nil {
		w = &window{}
		l.keys[key] = w
	}
	w.label = label
	if now.Sub(w.start) >= time.Second {
		w.start, w.n = now, 0
	}
	if w.n >= l.PerSecond {
		w.suppressed++
		return false
	}
	w.n++
	return true
}

// Flush returns, by key, the counts of windows ended by now that were not
// recorded one by one, and starts counting afresh.
func (l *Limiter) Flush(now time.Time) []Suppressed {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Suppressed
	for k, w := range l.keys {
		if w.suppressed > 0 && now.Sub(w.start) >= time.Second {
			out = append(out, Suppressed{Key: k, Label: w.label, N: w.suppressed})
			w.suppressed = 0
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Forget drops a key (a container that stopped) with what it counted.
func (l *Limiter) Forget(key string) {
	l.mu.Lock()
	delete(l.keys, key)
	l.mu.Unlock()
}
