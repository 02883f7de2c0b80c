package audit

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestLimiter: per key and second, PerSecond records pass and the rest
// are counted into one summary after the window; keys do not share a
// budget; concurrent callers (under -race) lose no count.
func TestLimiter(t *testing.T) {
	l := &Limiter{PerSecond: 10}
	now := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	passed := map[string]int{}
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			key := fmt.Sprint("c", g%2)
			for i := 0; i < 100; i++ {
				if l.Allow(key, "name-"+key, now) {
					mu.Lock()
					passed[key]++
					mu.Unlock()
				}
			}
		}(g)
	}
	wg.Wait()
	if passed["c0"] != 10 || passed["c1"] != 10 {
		t.Errorf("passed %v, want 10 per key", passed)
	}
	if s := l.Flush(now.Add(500 * time.Millisecond)); len(s) != 0 {
		t.Errorf("summaries before the window ended: %v", s)
	}
	s := l.Flush(now.Add(time.Second))
	if len(s) != 2 || s[0].N != 390 || s[1].N != 390 || s[0].Label != "name-c0" {
		t.Errorf("summaries %+v, want 390 for each key", s)
	}
	if s := l.Flush(now.Add(2 * time.Second)); len(s) != 0 {
		t.Errorf("counted twice: %v", s)
	}
	if !l.Allow("c0", "name-c0", now.Add(time.Second)) {
		t.Error("a new window did not start")
	}
	l.Forget("c0")
	if s := l.Flush(now.Add(3 * time.Second)); len(s) != 0 {
		t.Errorf("a forgotten key: %v", s)
	}
}
