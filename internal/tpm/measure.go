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
	// The log lives in its file, not in memory (a device measures for
	// years): what is kept is its length, where its last record starts,
	// and the PCR values it replays to with and without that record.
	count  int
	size   int64
	replay []byte
	resets int
	// ahead are the PCR values the log replays to before each of its last
	// records, and where those records start: a crash during a group
	// commit leaves at most maxBatch records the PCR never saw.
	ahead []aheadMark

	qmu     sync.Mutex // guards queue and leading; never held across I/O
	queue   []*pendingMeasure
	leading bool
}

type aheadMark struct {
	replay []byte
	start  int64
}

// NewMeasurer opens the measurement log at logPath against the TPM rw.
// A log whose replay does not give the PCR's current value is refused,
// unless the PCR is still zero (the TPM was reset, e.g. by a reboot): then
// the old log is kept as logPath.old and a new one starts.
func NewMeasurer(rw io.ReadWriteCloser, pcr int, logPath string) (*Measurer, error) {
	m := &Measurer{rw: rw, pcr: pcr, logPath: logPath, replay: make([]byte, sha256.Size)}
	b, err := os.ReadFile(logPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var off int64
	if err := measurelog.Walk(b, func(r measurelog.Record) error {
		enc, err := encodeRecord(r)
		if err != nil {
			return err
		}
		m.add(r, off, int64(len(enc)))
		off += int64(len(enc))
		return nil
	}); err != nil {
		return nil, fmt.Errorf("measurement log %s: %w", logPath, err)
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
	if bytes.Equal(m.replay, cur) {
		return false, nil
	}
	if !bytes.Equal(cur, make([]byte, sha256.Size)) {
		// The log is written ahead of the PCR: its last records never
		// reached the TPM (cmld died, or an extend failed, in between).
		// Drop them; the starts they describe did not happen. At most a
		// batch: anything more is not a crash but a log that disagrees.
		for i := len(m.ahead) - 1; i >= 0; i-- {
			if !bytes.Equal(m.ahead[i].replay, cur) {
				continue
			}
			if err := os.Truncate(m.logPath, m.ahead[i].start); err != nil {
				return false, fmt.Errorf("repair measurement log: %w", err)
			}
			m.count -= len(m.ahead) - i
			m.size, m.replay = m.ahead[i].start, m.ahead[i].replay
			m.ahead = m.ahead[:i]
			return false, nil
		}
		if m.count == 0 {
			// Something else measures into this PCR on this host (for
			// example systemd-stub measures unified kernel images into 11).
			return false, fmt.Errorf("PCR %d already holds measurements cmld did not make (another component of this host uses it): choose a PCR nothing else extends with measurement_pcr in device.conf", m.pcr)
		}
		return false, fmt.Errorf("measurement log %s does not replay to PCR %d: log and TPM disagree", m.logPath, m.pcr)
	}
	if err := os.Rename(m.logPath, m.logPath+".old"); err != nil {
		return false, err
	}
	m.count, m.size, m.replay, m.ahead = 0, 0, make([]byte, sha256.Size), nil
	m.resets++
	return true, nil
}

// add accounts for record r of n bytes at offset off, as the log's last.
// Records of another PCR (measurement_pcr was changed) stay in the log but
// do not count towards the replay.
func (m *Measurer) add(r measurelog.Record, off, n int64) {
	m.ahead = append(m.ahead, aheadMark{replay: m.replay, start: off})
	if len(m.ahead) > maxBatch {
		m.ahead = m.ahead[len(m.ahead)-maxBatch:]
	}
	if int(r.Index) == m.pcr {
		m.replay = measurelog.Extend(m.replay, r.Digests[crypto.SHA256])
	}
	m.size = off + n
	m.count++
}

func encodeRecord(r measurelog.Record) ([]byte, error) {
	var buf bytes.Buffer
	err := r.EncodeCELR(&buf)
	return buf.Bytes(), err
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
// between leaves a log with records the PCR never saw, which the next load
// drops, never a PCR the log cannot explain (a hardware TPM keeps its PCRs
// until the host reboots). A caller that has gone away measures nothing.
//
// Concurrent starts are measured in batches (group commit): one check of
// the PCR and one synced write of the log for all of them, then one
// extend each in log order. Each caller learns its own outcome.
func (m *Measurer) Measure(ctx context.Context, e Event) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p := &pendingMeasure{ctx: ctx, ev: e, done: make(chan error, 1)}
	m.qmu.Lock()
	m.queue = append(m.queue, p)
	lead := !m.leading
	m.leading = true
	m.qmu.Unlock()
	if lead {
		m.drain()
	}
	return <-p.done
}

// maxBatch bounds one group commit, and so how many records a log may be
// ahead of the PCR after a crash.
const maxBatch = 32

type pendingMeasure struct {
	ctx  context.Context
	ev   Event
	done chan error
}

// drain measures queued events until the queue is empty.
func (m *Measurer) drain() {
	for {
		m.qmu.Lock()
		n := min(len(m.queue), maxBatch)
		batch := append([]*pendingMeasure(nil), m.queue[:n]...)
		m.queue = m.queue[n:]
		if n == 0 {
			m.leading = false
		}
		m.qmu.Unlock()
		if n == 0 {
			return
		}
		m.mu.Lock()
		m.measureBatch(batch)
		m.mu.Unlock()
	}
}

// measureBatch writes and extends batch; m.mu is held.
func (m *Measurer) measureBatch(batch []*pendingMeasure) {
	live := batch[:0:0]
	for _, p := range batch {
		if err := p.ctx.Err(); err != nil {
			p.done <- err // gone before anything was measured
			continue
		}
		live = append(live, p)
	}
	if len(live) == 0 {
		return
	}
	fail := func(ps []*pendingMeasure, err error) {
		for _, p := range ps {
			p.done <- err
		}
	}
	if _, err := m.sync(); err != nil {
		fail(live, err)
		return
	}
	recs := make([]measurelog.Record, len(live))
	sizes := make([]int64, len(live))
	var buf bytes.Buffer
	for i, p := range live {
		rec, err := m.recordAt(p.ev, m.count+i)
		if err == nil {
			err = rec.EncodeCELR(&buf)
		}
		if err != nil {
			fail(live, err)
			return
		}
		recs[i], sizes[i] = rec, int64(buf.Len())
	}
	f, err := os.OpenFile(m.logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		fail(live, err)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		fail(live, err)
		return
	}
	base := st.Size()
	_, err = f.Write(buf.Bytes())
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		// Nothing was extended: the starts do not happen.
		f.Truncate(base)
		fail(live, fmt.Errorf("write measurement log: %w", err))
		return
	}
	off := base
	for i, rec := range recs {
		if err := tpm2.PCRExtend(m.rw, tpmutil.Handle(m.pcr), tpm2.AlgSHA256, rec.Digests[crypto.SHA256], ""); err != nil {
			// Not extended: take this record and the ones after it
			// back. Should that fail too, the next sync drops them
			// (the log is ahead of the PCR by at most a batch).
			if terr := f.Truncate(off); terr == nil {
				f.Sync()
			}
			fail(live[i:], fmt.Errorf("extend PCR %d: %w", m.pcr, err))
			return
		}
		end := base + sizes[i]
		m.add(rec, off, end-off)
		off = end
		live[i].done <- nil
	}
}

type celRecord = measurelog.Record

// record builds the log record for e as the next one.
func (m *Measurer) record(e Event) (measurelog.Record, error) { return m.recordAt(e, m.count) }

// recordAt builds the log record for e with record number n.
func (m *Measurer) recordAt(e Event, n int) (measurelog.Record, error) {
	digest, err := e.GenerateDigest(crypto.SHA256)
	if err != nil {
		return measurelog.Record{}, err
	}
	tlv, err := e.GetTLV()
	if err != nil {
		return measurelog.Record{}, err
	}
	return measurelog.Record{RecNum: uint64(n), Index: uint8(m.pcr), IndexType: measurelog.PCRTypeValue,
		Digests: map[crypto.Hash][]byte{crypto.SHA256: digest}, Content: tlv}, nil
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
	log, err := m.readLog()
	return q, log, err
}

// Log returns the measurement log, CEL-encoded.
func (m *Measurer) Log() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.readLog()
}

// readLog reads the part of the log file the PCR covers; m.mu is held.
func (m *Measurer) readLog() ([]byte, error) {
	if m.size == 0 {
		return nil, nil
	}
	f, err := os.Open(m.logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, m.size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("read measurement log: %w", err)
	}
	return b, nil
}
