package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cmlproject/cml/internal/atomicfile"
)

// Forwarder sends the trail and its checkpoints to a collector: RFC 5424
// messages over mutual TLS with octet-counting framing (RFC 5425). A
// persistent cursor (<trail>.forwarded) means nothing is lost while the
// collector is down or slow; delivery is at least once (after a broken
// connection the last batch is sent again), and every message carries
// the record's sequence number so a collector can deduplicate.
type Forwarder struct {
	Sink       *FileSink
	Addr       string
	TLS        *tls.Config // RootCAs, ServerName, the device's client certificate
	Hostname   string
	DeviceUUID string
	Log        *slog.Logger

	lag     atomic.Uint64
	healthy atomic.Bool
}

type cursor struct {
	Log         int64 `json:"log"`         // bytes of the trail delivered
	Checkpoints int64 `json:"checkpoints"` // bytes of the checkpoints file
}

func (f *Forwarder) cursorPath() string { return f.Sink.Path() + ".forwarded" }

func (f *Forwarder) readCursor() cursor {
	var c cursor
	if b, err := os.ReadFile(f.cursorPath()); err == nil {
		json.Unmarshal(b, &c)
	}
	return c
}

func (f *Forwarder) writeCursor(c cursor) error {
	b, _ := json.Marshal(c)
	return atomicfile.Write(f.cursorPath(), b, 0o600)
}

// Lag is how many bytes of the trail the collector has not received.
func (f *Forwarder) Lag() uint64 { return f.lag.Load() }

// Run forwards until ctx ends, reconnecting with backoff. Each outage
// is audited once, and again when its kind changes (a collector that
// cannot be reached, one whose certificate is refused).
func (f *Forwarder) Run(ctx context.Context) {
	backoff := time.Second
	audited := ""
	for ctx.Err() == nil {
		f.healthy.Store(false)
		err := f.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if f.healthy.Load() {
			backoff, audited = time.Second, ""
		}
		f.healthy.Store(false)
		kind := "unreachable"
		if strings.Contains(err.Error(), "certificate") || strings.Contains(err.Error(), "tls:") {
			kind = "refused"
		}
		if kind != audited {
			reason := "the collector cannot be reached: " + oneLine(err) + "; records are kept and sent when it is back"
			if kind == "refused" {
				reason = "TLS with the collector failed (certificate refused by either side): " + oneLine(err) + "; records are kept"
			}
			f.Sink.Record(ctx, Event{Type: "daemon", Operation: "audit.forward", Outcome: Failure, Object: f.Addr, Reason: reason})
			audited = kind
		}
		f.Log.Warn("audit forwarding", "collector", f.Addr, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		if backoff < 8*time.Second {
			backoff *= 2
		}
	}
}

func oneLine(err error) string {
	s := err.Error()
	if i := bytes.IndexByte([]byte(s), '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// session is one connection: it sends what the cursor has not seen, then
// follows the trail.
func (f *Forwarder) session(ctx context.Context) error {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: f.TLS}
	conn, err := d.DialContext(ctx, "tcp", f.Addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	// Under TLS 1.3 a rejected client certificate shows only on a later
	// read: watch the connection.
	broken := make(chan error, 1)
	go func() {
		b := make([]byte, 512)
		for {
			if _, err := conn.Read(b); err != nil {
				broken <- err
				return
			}
		}
	}()
	go func() { <-ctx.Done(); conn.Close() }()
	cur := f.readCursor()
	// What was sent in the last few seconds may still sit in the
	// collector's buffers when it dies: the persisted cursor stays that
	// far behind, so a new session sends it again (at least once).
	type sentAt struct {
		t time.Time
		c cursor
	}
	history := []sentAt{{time.Time{}, cur}}
	safe := func() cursor {
		c := history[0].c
		for _, h := range history {
			if time.Since(h.t) >= resendWindow {
				c = h.c
			}
		}
		for len(history) > 1 && time.Since(history[1].t) >= resendWindow {
			history = history[1:]
		}
		return c
	}
	w := bufio.NewWriter(conn)
	for {
		select {
		case err := <-broken:
			return fmt.Errorf("connection lost: %w", err)
		default:
		}
		sent, err := f.sendNew(w, &cur)
		if err != nil {
			return err
		}
		if sent {
			if err := w.Flush(); err != nil {
				return err
			}
			// The collector may still drop what was in flight when the
			// connection breaks; a short wait for an alert before the
			// cursor moves keeps delivery at least once.
			select {
			case err := <-broken:
				return fmt.Errorf("connection lost: %w", err)
			case <-time.After(50 * time.Millisecond):
			}
			history = append(history, sentAt{time.Now(), cur})
			if err := f.writeCursor(safe()); err != nil {
				return err
			}
			f.healthy.Store(true)
			continue
		}
		f.writeCursor(safe())
		f.healthy.Store(true)
		select {
		case err := <-broken:
			return fmt.Errorf("connection lost: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// resendWindow is how long sent records count as possibly undelivered.
const resendWindow = 5 * time.Second

// sendNew writes the records and checkpoints past the cursor to w and
// advances the cursor (in memory).
func (f *Forwarder) sendNew(w io.Writer, cur *cursor) (bool, error) {
	sent := false
	log, err := os.ReadFile(f.Sink.Path())
	if err != nil {
		return false, err
	}
	if cur.Log > int64(len(log)) {
		cur.Log = 0 // a new trail
	}
	f.lag.Store(uint64(int64(len(log)) - cur.Log))
	for n := 0; n < 500; n++ {
		rest := log[cur.Log:]
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			break
		}
		line := rest[:i]
		if err := f.write(w, "record", line); err != nil {
			return sent, err
		}
		cur.Log += int64(i + 1)
		sent = true
	}
	if cps, err := os.ReadFile(f.Sink.Path() + ".checkpoints"); err == nil && cur.Checkpoints < int64(len(cps)) {
		rest := cps[cur.Checkpoints:]
		for {
			i := bytes.IndexByte(rest, '\n')
			if i < 0 {
				break
			}
			if err := f.write(w, "checkpoint", rest[:i]); err != nil {
				return sent, err
			}
			cur.Checkpoints += int64(i + 1)
			rest = rest[i+1:]
			sent = true
		}
	}
	return sent, nil
}

// write frames one RFC 5424 message: facility 13 (log audit), severity
// notice, critical for integrity violations, warning for other failures.
func (f *Forwarder) write(w io.Writer, msgid string, body []byte) error {
	var rec Event
	json.Unmarshal(body, &rec)
	sev := 5
	switch {
	case Integrity(rec):
		sev = 2
	case rec.Outcome == Failure:
		sev = 4
	}
	ts := rec.Time
	if ts.IsZero() {
		ts = time.Now()
	}
	sd := fmt.Sprintf(`[cml@32473 device="%s"]`, f.DeviceUUID)
	if msgid == "record" {
		sd = fmt.Sprintf(`[cml@32473 seq="%d" device="%s"]`, rec.Seq, f.DeviceUUID)
	}
	msg := fmt.Sprintf("<%d>1 %s %s cmld %d %s %s %s", 13*8+sev, ts.UTC().Format(time.RFC3339Nano), f.Hostname, os.Getpid(), msgid, sd, body)
	_, err := io.WriteString(w, strconv.Itoa(len(msg))+" "+msg)
	return err
}

// Confirmed reports whether the collector has had the first n bytes of
// the trail for longer than the resend window (what a rotation may drop).
func (f *Forwarder) Confirmed(n int64) bool { return f.readCursor().Log >= n }
