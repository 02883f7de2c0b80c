// Package measurelog is the format of CML's measurement log, shared by
// the daemon that writes it and the verifier that checks it off the
// device: the container-start event, the TCG Canonical Event Log (CEL)
// TLV encoding of records, the digest extended for each, and replaying a
// log to a PCR value.
//
// The CEL codec is our own (about a hundred lines of the TCG CEL
// specification's TLV form) so that the verifier links no TPM access
// code: go-tpm-tools' cel package pulls in its TPM client and, with it,
// SEV and TDX guest code. Logs are byte-compatible with go-tpm-tools (a
// test checks both directions). It has no daemon code.
package measurelog

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
)

// DefaultPCR is the PCR container starts are measured into (as GyroidOS).
const DefaultPCR = 11

// EventType is the CEL content type of a CML container-start event, in
// the range the CEL specification leaves to vendors.
const EventType uint8 = 0xC0

// CEL field types (TCG CEL specification, 5.1) and the TPM algorithm id
// of SHA-256, which names a digest inside the digests field.
const (
	recnumType   uint8 = 0
	PCRTypeValue uint8 = 1 // the record's index is a PCR
	digestsType  uint8 = 3
	algSHA256    uint8 = 0x0B
)

// TLV is one CEL type-length-value field: type (1 byte), length (4 bytes,
// big endian), value.
type TLV struct {
	Type  uint8
	Value []byte
}

// MarshalBinary encodes t.
func (t TLV) MarshalBinary() ([]byte, error) {
	if uint64(len(t.Value)) > 1<<32-1 {
		return nil, errors.New("CEL field too large")
	}
	b := make([]byte, 5+len(t.Value))
	b[0] = t.Type
	binary.BigEndian.PutUint32(b[1:5], uint32(len(t.Value)))
	copy(b[5:], t.Value)
	return b, nil
}

func (t TLV) append(buf *bytes.Buffer) {
	b, _ := t.MarshalBinary()
	buf.Write(b)
}

// nextTLV reads one TLV from b and returns it and the rest.
func nextTLV(b []byte) (TLV, []byte, error) {
	if len(b) < 5 {
		return TLV{}, nil, errors.New("truncated CEL field")
	}
	n := binary.BigEndian.Uint32(b[1:5])
	if uint64(n) > uint64(len(b)-5) {
		return TLV{}, nil, fmt.Errorf("CEL field of %d bytes runs past the end", n)
	}
	return TLV{Type: b[0], Value: b[5 : 5+n]}, b[5+n:], nil
}

// Record is one CEL record: its number, the PCR it was extended into, its
// digests by hash, and its content.
type Record struct {
	RecNum    uint64
	Index     uint8
	IndexType uint8
	Digests   map[crypto.Hash][]byte
	Content   TLV
}

// EncodeCELR appends r's encoding to buf.
func (r Record) EncodeCELR(buf *bytes.Buffer) error {
	var num [8]byte
	binary.BigEndian.PutUint64(num[:], r.RecNum)
	d, ok := r.Digests[crypto.SHA256]
	if !ok || len(d) != sha256.Size {
		return errors.New("CEL record without a SHA-256 digest")
	}
	var digests bytes.Buffer
	TLV{algSHA256, d}.append(&digests)
	TLV{recnumType, num[:]}.append(buf)
	TLV{r.IndexType, []byte{r.Index}}.append(buf)
	TLV{digestsType, digests.Bytes()}.append(buf)
	r.Content.append(buf)
	return nil
}

// Log is a measurement log: CEL records in order.
type Log struct {
	Records []Record
}

// EncodeCEL appends the whole log's encoding to buf.
func (l Log) EncodeCEL(buf *bytes.Buffer) error {
	for _, r := range l.Records {
		if err := r.EncodeCELR(buf); err != nil {
			return err
		}
	}
	return nil
}

// MaxLog bounds a measurement log a verifier will parse: about 800,000
// starts. Walk never holds more than one record beyond the log's bytes.
const MaxLog = 256 << 20

// DecodeLog parses a CEL-encoded measurement log into records. Only PCR
// records with a SHA-256 digest are accepted; anything malformed is an
// error, never a partial log. (Long logs are better walked.)
func DecodeLog(b []byte) (Log, error) {
	var l Log
	err := Walk(b, func(r Record) error {
		l.Records = append(l.Records, r)
		return nil
	})
	if err != nil {
		return Log{}, err
	}
	return l, nil
}

// Walk calls fn for each record of the CEL-encoded log b, in order,
// without keeping them: memory stays bounded whatever the log's length.
// A malformed record ends the walk with an error.
func Walk(b []byte, fn func(Record) error) error {
	if len(b) > MaxLog {
		return fmt.Errorf("measurement log of %d bytes exceeds %d", len(b), MaxLog)
	}
	for n := 0; len(b) > 0; n++ {
		var fields [4]TLV
		for i := range fields {
			var err error
			if fields[i], b, err = nextTLV(b); err != nil {
				return fmt.Errorf("record %d: %w", n, err)
			}
		}
		num, idx, dig, content := fields[0], fields[1], fields[2], fields[3]
		if num.Type != recnumType || len(num.Value) != 8 {
			return fmt.Errorf("record %d: bad record number field", n)
		}
		if idx.Type != PCRTypeValue || len(idx.Value) != 1 {
			return fmt.Errorf("record %d: not a PCR record", n)
		}
		if dig.Type != digestsType {
			return fmt.Errorf("record %d: bad digests field", n)
		}
		r := Record{RecNum: binary.BigEndian.Uint64(num.Value), Index: idx.Value[0], IndexType: idx.Type, Digests: map[crypto.Hash][]byte{}, Content: content}
		for rest := dig.Value; len(rest) > 0; {
			var d TLV
			var err error
			if d, rest, err = nextTLV(rest); err != nil {
				return fmt.Errorf("record %d: digests: %w", n, err)
			}
			if d.Type == algSHA256 {
				if len(d.Value) != sha256.Size {
					return fmt.Errorf("record %d: SHA-256 digest of %d bytes", n, len(d.Value))
				}
				r.Digests[crypto.SHA256] = d.Value
			}
		}
		if r.Digests[crypto.SHA256] == nil {
			return fmt.Errorf("record %d: no SHA-256 digest", n)
		}
		if err := fn(r); err != nil {
			return err
		}
	}
	return nil
}

// Extend returns the PCR value after extending v with digest.
func Extend(v, digest []byte) []byte {
	h := sha256.New()
	h.Write(v)
	h.Write(digest)
	return h.Sum(nil)
}

// Event is one measured container start: enough for a verifier to map it
// to a signed guest OS version and a signed config.
type Event struct {
	Container    string `json:"container"` // UUID
	Name         string `json:"name"`
	GuestOS      string `json:"guestos"`
	Version      uint64 `json:"version"`
	VerityRoot   string `json:"verity_root"`   // hex, from the signed manifest
	ConfigSHA256 string `json:"config_sha256"` // hex, of the exact config bytes
}

// GetTLV encodes the event as CEL content.
func (e Event) GetTLV() (TLV, error) {
	b, err := json.Marshal(e)
	return TLV{Type: EventType, Value: b}, err
}

// GenerateDigest is the digest extended into the PCR: the hash of the
// event's TLV encoding, so the log entry and the extend cannot disagree.
func (e Event) GenerateDigest(h crypto.Hash) ([]byte, error) {
	tlv, err := e.GetTLV()
	if err != nil {
		return nil, err
	}
	b, err := tlv.MarshalBinary()
	if err != nil {
		return nil, err
	}
	d := h.New()
	d.Write(b)
	return d.Sum(nil), nil
}

// ContentMatches reports whether r's SHA-256 digest is the hash of its
// content's encoding, as the device extended it.
func ContentMatches(r Record) bool {
	b, _ := r.Content.MarshalBinary()
	sum := sha256.Sum256(b)
	return bytes.Equal(sum[:], r.Digests[crypto.SHA256])
}

// ParseEvent decodes a record's content.
func ParseEvent(t TLV) (Event, error) {
	var e Event
	if t.Type != EventType {
		return e, fmt.Errorf("CEL content type %#x is not a CML container start", t.Type)
	}
	err := json.Unmarshal(t.Value, &e)
	return e, err
}

// Replay returns the SHA-256 PCR value the log's records for pcr give,
// extending from zero.
func Replay(l Log, pcr int) []byte {
	v := make([]byte, sha256.Size)
	for _, r := range l.Records {
		if int(r.Index) != pcr || r.IndexType != PCRTypeValue {
			continue
		}
		v = Extend(v, r.Digests[crypto.SHA256])
	}
	return v
}
