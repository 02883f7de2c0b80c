// Package tpm is CML's access to a TPM 2.0: the kernel's resource manager
// (/dev/tpmrm0), a software TPM (swtpm) that cmld supervises when the
// device has none, or the reference simulator in tests. It measures
// container starts into a PCR with a TCG Canonical Event Log that replays
// to it, keeps the device's identity keys (attestation and TLS) resident
// in the TPM, quotes PCRs for remote attestation, and holds the guest OS
// rollback counter in NV memory.
//
// It does not verify quotes (package attest does, without a TPM) and does
// not seal data (the storage-encryption issue adds that).
package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/measurelog"
)

// The measurement-log format lives in package measurelog, which the
// off-device verifier shares without linking TPM access code.
const (
	DefaultPCR = measurelog.DefaultPCR
	EventType  = measurelog.EventType
	MaxLog     = measurelog.MaxLog
)

// Event is one measured container start (see measurelog.Event).
type Event = measurelog.Event

// Replay, DecodeLog and ParseEvent are measurelog's.
var (
	Replay     = measurelog.Replay
	DecodeLog  = measurelog.DecodeLog
	ParseEvent = measurelog.ParseEvent
)

// Measurer extends container-start events into one PCR and appends them
// to a persistent event log.
type Measurer struct {
	rw      io.ReadWriteCloser
	pcr     int
	logPath string
	mu      sync.Mutex
	log     measurelog.Log
	resets  int
}

// NewMeasurer opens the measurement log at logPath against the TPM rw.
// A log whose replay does not give the PCR's current value is refused,
// unless the PCR is still zero (the TPM was reset, e.g. by a reboot): then
// the old log is kept as logPath.old and a new one starts.
func NewMeasurer(rw io.ReadWriteCloser, pcr int, logPath string) (*Measurer, error) {
	m := &Measurer{rw: rw, pcr: pcr, logPath: logPath}
	b, err := os.ReadFile(logPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if len(b) > 0 {
		if m.log, err = measurelog.DecodeLog(b); err != nil {
			return nil, fmt.Errorf("measurement log %s: %w", logPath, err)
		}
	}
	if _, err := m.sync(); err != nil {
		return nil, err
	}
	return m, nil
}

// sync checks the log against the PCR. When the PCR is zero but the log is
// not empty, the TPM was reset (a reboot, a restarted swtpm): the old log
// is kept as logPath.old and a new one starts. A log one record ahead of
// the PCR is repaired (see Measure). Any other disagreement is refused:
// someone else extended the PCR, or the log was edited.
func (m *Measurer) sync() (reset bool, err error) {
	cur, err := m.PCRValue()
	if err != nil {
		return false, err
	}
	if bytes.Equal(Replay(m.log, m.pcr), cur) {
		return false, nil
	}
	if !bytes.Equal(cur, make([]byte, sha256.Size)) {
		if n := len(m.log.Records); n > 0 && bytes.Equal(Replay(measurelog.Log{Records: m.log.Records[:n-1]}, m.pcr), cur) {
			// The log is written ahead of the PCR: its last record never
			// reached the TPM (cmld died, or the extend failed, in between).
			// Drop that record; the start it describes did not happen.
			if err := m.rewrite(m.log.Records[:n-1]); err != nil {
				return false, err
			}
			return false, nil
		}
		if len(m.log.Records) == 0 {
			// Something else measures into this PCR on this host (for
			// example systemd-stub measures unified kernel images into 11).
			return false, fmt.Errorf("PCR %d already holds measurements cmld did not make (another component of this host uses it): choose a PCR nothing else extends with measurement_pcr in device.conf", m.pcr)
		}
		return false, fmt.Errorf("measurement log %s does not replay to PCR %d: log and TPM disagree", m.logPath, m.pcr)
	}
	if err := os.Rename(m.logPath, m.logPath+".old"); err != nil {
		return false, err
	}
	m.log = measurelog.Log{}
	m.resets++
	return true, nil
}

// Check compares the log with the PCR now, starting the log over when the
// TPM was reset (see Resets).
func (m *Measurer) Check() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, err := m.sync()
	return err
}

// Resets counts how often the log started over since the Measurer was
// made, including at NewMeasurer; the daemon re-measures running
// containers when it grows.
func (m *Measurer) Resets() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.resets
}

// PCR is the PCR measured into.
func (m *Measurer) PCR() int { return m.pcr }

// PCRValue reads the measurement PCR's SHA-256 value.
func (m *Measurer) PCRValue() ([]byte, error) {
	v, err := tpm2.ReadPCRs(m.rw, tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: []int{m.pcr}})
	if err != nil {
		return nil, fmt.Errorf("read PCR %d: %w", m.pcr, err)
	}
	return v[m.pcr], nil
}

// Measure appends e to the log and then extends it into the PCR: the
// record is on disk (synced) before the PCR holds it, so a crash in
// between leaves a log with one record too many, which the next load
// repairs, never a PCR the log cannot explain (a hardware TPM keeps its
// PCRs until the host reboots). A caller that has gone away measures
// nothing.
func (m *Measurer) Measure(ctx context.Context, e Event) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.sync(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	rec, err := m.record(e)
	if err != nil {
		return err
	}
	digest := rec.Digests[crypto.SHA256]
	var buf bytes.Buffer
	if err := rec.EncodeCELR(&buf); err != nil {
		return err
	}
	f, err := os.OpenFile(m.logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if _, err := f.Write(buf.Bytes()); err != nil {
		f.Truncate(st.Size())
		return fmt.Errorf("write measurement log: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Truncate(st.Size())
		return fmt.Errorf("write measurement log: %w", err)
	}
	if err := tpm2.PCRExtend(m.rw, tpmutil.Handle(m.pcr), tpm2.AlgSHA256, digest, ""); err != nil {
		// Not extended: take the record back. Should that fail too, the
		// next sync drops it (the log is one record ahead of the PCR).
		if terr := f.Truncate(st.Size()); terr == nil {
			f.Sync()
		}
		return fmt.Errorf("extend PCR %d: %w", m.pcr, err)
	}
	m.log.Records = append(m.log.Records, rec)
	return nil
}

type celRecord = measurelog.Record

// record builds the log record for e as the next one.
func (m *Measurer) record(e Event) (measurelog.Record, error) {
	digest, err := e.GenerateDigest(crypto.SHA256)
	if err != nil {
		return measurelog.Record{}, err
	}
	tlv, err := e.GetTLV()
	if err != nil {
		return measurelog.Record{}, err
	}
	return measurelog.Record{RecNum: uint64(len(m.log.Records)), Index: uint8(m.pcr), IndexType: measurelog.PCRTypeValue,
		Digests: map[crypto.Hash][]byte{crypto.SHA256: digest}, Content: tlv}, nil
}

// rewrite replaces the log with records, atomically.
func (m *Measurer) rewrite(records []measurelog.Record) error {
	l := measurelog.Log{Records: records}
	var buf bytes.Buffer
	if err := l.EncodeCEL(&buf); err != nil {
		return err
	}
	if err := atomicfile.Write(m.logPath, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("repair measurement log: %w", err)
	}
	m.log = l
	return nil
}

// Attest quotes the selected PCRs with nonce and returns the quote with
// the log it covers, taken under one lock so no start can slip between.
func (m *Measurer) Attest(k *Keys, nonce []byte, pcrs []int) (*Quote, []byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	q, err := k.Quote(nonce, pcrs)
	if err != nil {
		return nil, nil, err
	}
	var buf bytes.Buffer
	if err := m.log.EncodeCEL(&buf); err != nil {
		return nil, nil, err
	}
	return q, buf.Bytes(), nil
}

// Log returns the measurement log, CEL-encoded.
func (m *Measurer) Log() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var buf bytes.Buffer
	err := m.log.EncodeCEL(&buf)
	return buf.Bytes(), err
}
