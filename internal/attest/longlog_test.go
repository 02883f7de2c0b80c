package attest

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/cmlproject/cml/internal/measurelog"
	"github.com/cmlproject/cml/internal/tpm"
	"github.com/cmlproject/cml/internal/tpmtest"
)

// Item 12: a device that has started containers for years keeps
// answering attestation challenges. 100,000 starts (a log of ~33 MB, far
// past the old 4 MiB limit) are written and extended as cmld would, then
// the device answers and the verifier checks every one of them, walking
// the log instead of holding it decoded.
func TestAttestationAfter100000Starts(t *testing.T) {
	if testing.Short() {
		t.Skip("long log: skipped with -short")
	}
	const n = 100000
	rw := tpmtest.Simulator(t)
	web := []byte("name: \"web\"\nguest_os: \"busybox\"\n")
	sum := sha256.Sum256(web)
	f := newFixtureWithLog(t, rw, func(logPath string) {
		var buf bytes.Buffer
		for i := 0; i < n; i++ {
			e := tpm.Event{Container: fmt.Sprintf("c%02d", i%10), Name: fmt.Sprintf("web%d", i%10), GuestOS: "busybox", Version: 3, VerityRoot: rootA, ConfigSHA256: hex.EncodeToString(sum[:])}
			d, _ := e.GenerateDigest(crypto.SHA256)
			tlv, _ := e.GetTLV()
			r := measurelog.Record{RecNum: uint64(i), Index: tpm.DefaultPCR, IndexType: measurelog.PCRTypeValue, Digests: map[crypto.Hash][]byte{crypto.SHA256: d}, Content: tlv}
			r.EncodeCELR(&buf)
			if err := tpm2.PCRExtend(rw, tpmutil.Handle(tpm.DefaultPCR), tpm2.AlgSHA256, d, ""); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(logPath, buf.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Logf("log of %d starts: %d bytes", n, buf.Len())
	})
	nonce := []byte("0123456789abcdef")
	a := f.attest(t, nonce)
	if len(a.GetEventLog()) < 4<<20 {
		t.Fatalf("log of %d bytes: not past the old limit", len(a.GetEventLog()))
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v := f.vf.Verify(a, nonce)
	runtime.ReadMemStats(&after)
	if !v.OK {
		t.Fatalf("verdict: %s", v.Reason())
	}
	starts := 0
	for _, c := range v.Containers {
		starts += c.Starts
	}
	if len(v.Containers) != 10 || starts != n {
		t.Errorf("%d containers, %d starts", len(v.Containers), starts)
	}
	// The verifier walks the log: what it allocates is a small multiple
	// of one record per event (digest maps), not the decoded log kept.
	t.Logf("verify allocated %d MB in total for a %d MB log", (after.TotalAlloc-before.TotalAlloc)>>20, len(a.GetEventLog())>>20)
}
