package measurelog

import (
	"bytes"
	"crypto"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/google/go-tpm-tools/cel"
)

func sampleLog(t *testing.T, n int) Log {
	var l Log
	for i := 0; i < n; i++ {
		e := Event{Container: fmt.Sprintf("c%d", i), Name: "web", GuestOS: "busybox", Version: uint64(i), VerityRoot: "ab", ConfigSHA256: "cd"}
		d, _ := e.GenerateDigest(crypto.SHA256)
		tlv, _ := e.GetTLV()
		l.Records = append(l.Records, Record{RecNum: uint64(i), Index: DefaultPCR, IndexType: PCRTypeValue, Digests: map[crypto.Hash][]byte{crypto.SHA256: d}, Content: tlv})
	}
	return l
}

// Logs are byte-compatible with go-tpm-tools' CEL code (what devices
// wrote before this codec, and what other verifiers read), both ways.
func TestInteropWithGoTPMTools(t *testing.T) {
	l := sampleLog(t, 20)
	var ours bytes.Buffer
	if err := l.EncodeCEL(&ours); err != nil {
		t.Fatal(err)
	}
	theirs, err := cel.DecodeToCEL(bytes.NewBuffer(append([]byte(nil), ours.Bytes()...)))
	if err != nil {
		t.Fatalf("go-tpm-tools cannot read our log: %v", err)
	}
	var back bytes.Buffer
	if err := theirs.EncodeCEL(&back); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back.Bytes(), ours.Bytes()) {
		t.Fatal("go-tpm-tools encodes the same records differently")
	}
	got, err := DecodeLog(back.Bytes())
	if err != nil || len(got.Records) != 20 {
		t.Fatalf("decode of go-tpm-tools' encoding: %d records, %v", len(got.Records), err)
	}
	for i, r := range got.Records {
		if r.RecNum != uint64(i) || !ContentMatches(r) {
			t.Errorf("record %d: %+v", i, r)
		}
		if _, err := ParseEvent(r.Content); err != nil {
			t.Error(err)
		}
	}
	if !bytes.Equal(Replay(got, DefaultPCR), Replay(l, DefaultPCR)) {
		t.Error("replay differs after a round trip")
	}
}

// Malformed logs are errors, never partial logs or panics.
func TestDecodeRefusesMalformed(t *testing.T) {
	var good bytes.Buffer
	sampleLog(t, 3).EncodeCEL(&good)
	b := good.Bytes()
	for _, n := range []int{1, 4, 5, 20, len(b) - 1} {
		if _, err := DecodeLog(b[:n]); err == nil {
			t.Errorf("log truncated to %d bytes decoded", n)
		}
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		c := append([]byte(nil), b...)
		c[r.IntN(len(c))] ^= byte(1 + r.IntN(255))
		DecodeLog(c) // must not panic
	}
}

func FuzzDecodeLog(f *testing.F) {
	var good bytes.Buffer
	sampleLog(nil, 2).EncodeCEL(&good)
	f.Add(good.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := DecodeLog(b)
		if err != nil {
			return
		}
		var again bytes.Buffer
		if err := l.EncodeCEL(&again); err != nil {
			t.Fatal(err)
		}
		l2, err := DecodeLog(again.Bytes())
		if err != nil || len(l2.Records) != len(l.Records) {
			t.Fatalf("re-encoded log does not decode: %v", err)
		}
	})
}
