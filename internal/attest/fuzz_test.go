package attest

import (
	"testing"

	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/tpmtest"
)

// FuzzVerify: an attestation answer comes from a device the verifier does
// not trust yet. Any bytes may fail verification; none may pass, and none
// may crash the verifier.
func FuzzVerify(f *testing.F) {
	fx := newFixture(f, tpmtest.Simulator(f))
	fx.start(f, "u1", "web", rootA, fx.web)
	nonce := []byte("0123456789abcdef")
	honest, _ := proto.Marshal(fx.attest(f, nonce))
	f.Add(honest)
	f.Fuzz(func(t *testing.T, b []byte) {
		var a cmlv1.Attestation
		if proto.Unmarshal(b, &a) != nil {
			return
		}
		v := fx.vf.Verify(&a, nonce)
		if v.OK && !proto.Equal(&a, mustUnmarshal(honest)) {
			// A changed answer may only pass if the change is in a
			// field the verdict does not depend on; that must not be
			// the quote, signature, log or certificates.
			var h cmlv1.Attestation
			proto.Unmarshal(honest, &h)
			if string(a.GetQuote()) != string(h.GetQuote()) || string(a.GetSignature()) != string(h.GetSignature()) || string(a.GetEventLog()) != string(h.GetEventLog()) {
				t.Fatalf("a changed answer passed verification")
			}
		}
	})
}

func mustUnmarshal(b []byte) *cmlv1.Attestation {
	var a cmlv1.Attestation
	proto.Unmarshal(b, &a)
	return &a
}
