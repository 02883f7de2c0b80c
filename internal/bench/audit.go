package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cmlproject/cml/internal/audit"
)

// auditThroughput measures durable audit records per second with 64
// concurrent writers: cmld's trail (group commit: writers share fsyncs)
// against one fsync per record on the same disk, interleaved.
func auditThroughput(w io.Writer, tmp string) error {
	const writers, each = 64, 400
	ev := audit.Event{Type: "management", Operation: "control.Start", Object: "bench", Outcome: audit.Success, Subject: &audit.Subject{UID: 0, PID: 1}}
	run := func(record func() error) (float64, error) {
		var wg sync.WaitGroup
		errs := make(chan error, writers)
		t0 := time.Now()
		for i := 0; i < writers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := 0; j < each; j++ {
					if err := record(); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			return 0, err
		}
		return float64(writers*each) / time.Since(t0).Seconds(), nil
	}
	var group, single []float64
	for r := 0; r < 3; r++ {
		dir := filepath.Join(tmp, fmt.Sprint("audit", r))
		os.MkdirAll(dir, 0o700)
		s, err := audit.OpenFile(filepath.Join(dir, "audit.log"), nil)
		if err != nil {
			return err
		}
		g, err := run(func() error { return s.Record(context.Background(), ev) })
		s.Close()
		if err != nil {
			return err
		}
		f, err := os.OpenFile(filepath.Join(dir, "single.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		var mu sync.Mutex
		line := []byte(`{"time":"2026-11-23T00:00:00Z","type":"management","operation":"control.Start","object":"bench","outcome":"success","seq":1,"chain":"00"}` + "\n")
		one, err := run(func() error {
			mu.Lock()
			defer mu.Unlock()
			if _, err := f.Write(line); err != nil {
				return err
			}
			return f.Sync()
		})
		f.Close()
		if err != nil {
			return err
		}
		group, single = append(group, g), append(single, one)
	}
	fmt.Fprintf(w, "audit: durable records per second, %d concurrent writers, 3 interleaved rounds: the trail (hash chain, Merkle tree, group commit) median %.0f/s (goal >= 50000); one fsync per record, same disk, median %.0f/s; median of per-round ratios %.1f\n",
		writers, medianF(group), medianF(single), medianPairRatio(group, single))
	return nil
}
