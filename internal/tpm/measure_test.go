package tpm

import (
	"bytes"
	"crypto"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm-tools/simulator"

	"github.com/cmlproject/cml/internal/measurelog"
)

// TestMeasurementLogReplays measures many starts on the reference TPM
// simulator, reopens the log as a daemon restart would, and checks that
// replaying it gives the PCR; then it edits the log as an attacker hiding
// a start would, and expects the replay to disagree.
func TestMeasurementLogReplays(t *testing.T) {
	sim, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	logPath := filepath.Join(t.TempDir(), "measurements.cel")
	m, err := NewMeasurer(sim, DefaultPCR, logPath)
	if err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3; round++ {
		for i := 0; i < 40; i++ {
			e := Event{Container: fmt.Sprintf("c%d", i%5), Name: "n", GuestOS: "busybox", Version: uint64(round + 1), VerityRoot: "ab", ConfigSHA256: "cd"}
			if err := m.Measure(t.Context(), e); err != nil {
				t.Fatal(err)
			}
		}
		// A daemon restart: a new Measurer on the same TPM and log.
		if m, err = NewMeasurer(sim, DefaultPCR, logPath); err != nil {
			t.Fatalf("reopen after round %d: %v", round, err)
		}
	}
	b, _ := os.ReadFile(logPath)
	l, err := measurelog.DecodeLog(b)
	if err != nil || len(l.Records) != 120 {
		t.Fatalf("log: %d records, %v", len(l.Records), err)
	}
	pcr, _ := m.PCRValue()
	if !bytes.Equal(Replay(l, DefaultPCR), pcr) {
		t.Fatal("replay of 120 events does not give the PCR")
	}
	for _, r := range l.Records {
		e, err := ParseEvent(r.Content)
		if err != nil {
			t.Fatal(err)
		}
		if d, _ := e.GenerateDigest(crypto.SHA256); !bytes.Equal(d, r.Digests[crypto.SHA256]) || !measurelog.ContentMatches(r) {
			err := fmt.Errorf("digest mismatch")
			t.Fatalf("record %d: content does not match its digest: %v", r.RecNum, err)
		}
	}
	// Removing one event, or swapping two, breaks the replay.
	removed := measurelog.Log{Records: append(append([]measurelog.Record{}, l.Records[:10]...), l.Records[11:]...)}
	swapped := measurelog.Log{Records: append([]measurelog.Record{}, l.Records...)}
	swapped.Records[3], swapped.Records[4] = swapped.Records[4], swapped.Records[3]
	for name, bad := range map[string]measurelog.Log{"removed": removed, "reordered": swapped} {
		if bytes.Equal(Replay(bad, DefaultPCR), pcr) {
			t.Errorf("%s event: replay still matches", name)
		}
	}
	// A log that disagrees with the TPM is refused on open.
	var buf bytes.Buffer
	removed.EncodeCEL(&buf)
	os.WriteFile(logPath, buf.Bytes(), 0o600)
	if _, err := NewMeasurer(sim, DefaultPCR, logPath); err == nil {
		t.Fatal("a log with an event removed was accepted")
	}
}
