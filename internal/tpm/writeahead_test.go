package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"

	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/testutil"
)

// failExtend passes TPM commands through but fails TPM2_PCR_Extend.
type failExtend struct {
	io.ReadWriteCloser
	fail bool
}

func (f *failExtend) Write(b []byte) (int, error) {
	if f.fail && len(b) >= 10 && binary.BigEndian.Uint32(b[6:10]) == 0x182 {
		return 0, errors.New("injected: TPM gone")
	}
	return f.ReadWriteCloser.Write(b)
}

// Bug 8: the log is written ahead of the PCR. An extend that fails takes
// its record back, and a log whose last record never reached the PCR (cmld
// died in between) is repaired on load instead of refused: on a hardware
// TPM the PCR keeps its value until the host reboots.
func TestLogAheadOfPCRIsRepaired(t *testing.T) {
	sim, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	rw := &failExtend{ReadWriteCloser: sim}
	logPath := filepath.Join(t.TempDir(), "measurements.cel")
	m, err := NewMeasurer(rw, DefaultPCR, logPath)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := m.Measure(t.Context(), Event{Container: "c", Version: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	good, _ := os.ReadFile(logPath)

	rw.fail = true
	if err := m.Measure(t.Context(), Event{Container: "lost"}); err == nil {
		t.Fatal("measure succeeded without the extend")
	}
	rw.fail = false
	if now, _ := os.ReadFile(logPath); !bytes.Equal(now, good) {
		t.Error("a failed extend left its record in the log")
	}
	if err := m.Check(); err != nil {
		t.Fatalf("log and PCR disagree after a failed extend: %v", err)
	}

	// A crash after the record was synced and before the extend: the
	// record is in the log, not in the PCR.
	var extra bytes.Buffer
	f, _ := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND, 0)
	rec := recordFor(t, m, Event{Container: "crashed"})
	rec.EncodeCELR(&extra)
	f.Write(extra.Bytes())
	f.Close()
	m2, err := NewMeasurer(rw, DefaultPCR, logPath)
	if err != nil {
		t.Fatalf("a log one record ahead of the PCR was refused: %v", err)
	}
	if m2.count != 3 {
		t.Errorf("repaired log has %d records, want 3", m2.count)
	}
	if now, _ := os.ReadFile(logPath); !bytes.Equal(now, good) {
		t.Error("repair did not restore the log")
	}
	// A crash during a group commit leaves up to a batch of records
	// ahead: repaired too. More than a batch is not a crash but a log
	// that disagrees: refused.
	appendRecords := func(m *Measurer, n int) {
		var b bytes.Buffer
		for i := 0; i < n; i++ {
			r, _ := m.recordAt(Event{Container: fmt.Sprintf("ahead%d", i)}, m.count+i)
			r.EncodeCELR(&b)
		}
		f, _ := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND, 0)
		f.Write(b.Bytes())
		f.Close()
	}
	appendRecords(m2, 2)
	m3, err := NewMeasurer(rw, DefaultPCR, logPath)
	if err != nil || m3.count != 3 {
		t.Fatalf("two records ahead (a crash in a batch): %v, %d records", err, m3.count)
	}
	appendRecords(m3, maxBatch+1)
	if _, err := NewMeasurer(rw, DefaultPCR, logPath); err == nil {
		t.Error("a log more than a batch ahead of the PCR was accepted")
	}
}

// Concurrent measurements are grouped; each caller gets its own outcome,
// the log replays to the PCR, and a caller that has gone away is not
// measured.
func TestGroupCommit(t *testing.T) {
	sim, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	m, err := NewMeasurer(sim, DefaultPCR, filepath.Join(t.TempDir(), "m.cel"))
	if err != nil {
		t.Fatal(err)
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.Measure(gone, Event{Container: "gone"}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled caller: %v", err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 64)
	for i := range errs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = m.Measure(context.Background(), Event{Container: fmt.Sprint(i)})
		}(i)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("measure %d: %v", i, err)
		}
	}
	if m.count != 64 {
		t.Errorf("%d records, want 64", m.count)
	}
	if err := m.Check(); err != nil {
		t.Fatalf("log and PCR disagree after concurrent measurements: %v", err)
	}
	b, _ := m.Log()
	l, err := DecodeLog(b)
	if err != nil || len(l.Records) != 64 {
		t.Fatalf("log: %d records, %v", len(l.Records), err)
	}
	for i, r := range l.Records {
		if r.RecNum != uint64(i) {
			t.Fatalf("record %d numbered %d", i, r.RecNum)
		}
	}
}

// Bug 9: a TPM that does not answer fails the measurement within the
// command deadline, as Unavailable, instead of hanging the start; and the
// first command after the supervised swtpm restarted succeeds (the
// connection redials once).
func TestTPMDeadlineAndRedial(t *testing.T) {
	testutil.RequireTool(t, "swtpm")
	s, err := StartSwtpm(context.Background(), t.TempDir(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	c, err := s.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Timeout = 300 * time.Millisecond
	m, err := NewMeasurer(c, DefaultPCR, filepath.Join(t.TempDir(), "m.cel"))
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	pid := s.cmd.Process.Pid
	s.mu.Unlock()
	syscall.Kill(pid, syscall.SIGSTOP)
	err = m.Measure(t.Context(), Event{Container: "stuck"})
	syscall.Kill(pid, syscall.SIGCONT)
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("measure against a stopped TPM: %v, want unavailable", err)
	}

	c.Timeout = 0
	if _, err := m.PCRValue(); err != nil {
		t.Fatalf("after the TPM answers again: %v", err)
	}
	// swtpm dies and its supervisor restarts it: the next command, sent
	// on the connection to the dead one, is sent again on a new one.
	syscall.Kill(pid, syscall.SIGKILL)
	var v []byte
	for i := 0; i < 200; i++ {
		s.mu.Lock()
		restarted := s.cmd != nil && s.cmd.Process != nil && s.cmd.Process.Pid != pid
		s.mu.Unlock()
		if restarted {
			if _, err := os.Stat(s.socket); err == nil {
				break
			}
		}
		time.Sleep(25 * time.Millisecond)
	}
	if v, err = m.PCRValue(); err != nil {
		t.Fatalf("first command after the swtpm restart: %v", err)
	}
	if !bytes.Equal(v, make([]byte, 32)) {
		t.Error("restarted swtpm kept its PCRs")
	}
}

// recordFor builds the CEL record Measure would append next for e.
func recordFor(t *testing.T, m *Measurer, e Event) celRecord {
	t.Helper()
	r, err := m.record(e)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A log that cannot be written (a full disk) measures nothing: every
// caller of the batch gets the error, and the PCR is unchanged.
func TestFullDiskMeasuresNothing(t *testing.T) {
	sim, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	logPath := filepath.Join(t.TempDir(), "m.cel")
	m, err := NewMeasurer(sim, DefaultPCR, logPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Measure(t.Context(), Event{Container: "before"}); err != nil {
		t.Fatal(err)
	}
	before, _ := m.PCRValue()
	os.Remove(logPath)
	if err := os.Symlink("/dev/full", logPath); err != nil { // every write: ENOSPC
		t.Fatal(err)
	}
	if err := m.Measure(t.Context(), Event{Container: "lost"}); err == nil {
		t.Fatal("measured with a log that cannot be written")
	}
	if after, _ := m.PCRValue(); !bytes.Equal(before, after) {
		t.Error("the PCR was extended although the log write failed")
	}
}
