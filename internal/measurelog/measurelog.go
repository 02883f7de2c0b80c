// Package measurelog is the format of CML's measurement log, shared by
// the daemon that writes it and the verifier that checks it off the
// device: the container-start event, its CEL encoding and digest, and
// replaying a log to a PCR value. It has no TPM access and no daemon code,
// so cmlverify links only this.
package measurelog

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/json"
	"fmt"

	"github.com/google/go-tpm-tools/cel"
)

// DefaultPCR is the PCR container starts are measured into (as GyroidOS).
const DefaultPCR = 11

// EventType is the CEL content type of a CML container-start event, in
// the range the CEL specification leaves to vendors.
const EventType uint8 = 0xC0

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
func (e Event) GetTLV() (cel.TLV, error) {
	b, err := json.Marshal(e)
	return cel.TLV{Type: EventType, Value: b}, err
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

// ParseEvent decodes a record's content.
func ParseEvent(t cel.TLV) (Event, error) {
	var e Event
	if t.Type != EventType {
		return e, fmt.Errorf("CEL content type %#x is not a CML container start", t.Type)
	}
	err := json.Unmarshal(t.Value, &e)
	return e, err
}

// Replay returns the SHA-256 PCR value the log's records for pcr give,
// extending from zero.
func Replay(l cel.CEL, pcr int) []byte {
	v := make([]byte, sha256.Size)
	for _, r := range l.Records {
		if int(r.Index) != pcr || r.IndexType != cel.PCRTypeValue {
			continue
		}
		h := sha256.New()
		h.Write(v)
		h.Write(r.Digests[crypto.SHA256])
		v = h.Sum(nil)
	}
	return v
}

// MaxLog bounds a measurement log a verifier will parse.
const MaxLog = 4 << 20

// DecodeLog parses a CEL-encoded measurement log.
func DecodeLog(b []byte) (cel.CEL, error) {
	if len(b) > MaxLog {
		return cel.CEL{}, fmt.Errorf("measurement log of %d bytes exceeds %d", len(b), MaxLog)
	}
	if len(b) == 0 {
		return cel.CEL{}, nil
	}
	return cel.DecodeToCEL(bytes.NewBuffer(b))
}
