package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
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
	// Two records ahead is not a crash but a forged log: refused.
	f, _ = os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND, 0)
	r1, r2 := recordFor(t, m2, Event{Container: "x"}), recordFor(t, m2, Event{Container: "y"})
	r2.RecNum++
	var two bytes.Buffer
	r1.EncodeCELR(&two)
	r2.EncodeCELR(&two)
	f.Write(two.Bytes())
	f.Close()
	if _, err := NewMeasurer(rw, DefaultPCR, logPath); err == nil {
		t.Error("a log two records ahead of the PCR was accepted")
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
