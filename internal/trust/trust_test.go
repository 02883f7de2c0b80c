package trust_test

import (
	"crypto/x509"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/trust"
)

func mustSign(t *testing.T, p *testutil.PKI, msg []byte) []byte {
	s, err := sign.Sign(p.SignerKey, msg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLevelsRevocationAndChains(t *testing.T) {
	vendor := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	owner := testutil.NewPKI(t, "rsa-3072", "owner")
	state := t.TempDir()
	vendor.Provision(t, state)
	ts, err := trust.Open(filepath.Join(state, "trust"))
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("name: \"c\"\n")
	now := time.Now()
	r, err := ts.Verify(msg, mustSign(t, vendor, msg), sign.EncodeCertificates(vendor.Signer), now)
	if err != nil || r.Level != cmlv1.TrustLevel_SIGNED {
		t.Fatalf("vendor-signed: %v %v", r, err)
	}
	// Owner CA: untrusted until registered, then LOCALLY_SIGNED.
	ownerChain := sign.EncodeCertificates(owner.Signer)
	if _, err := ts.Verify(msg, mustSign(t, owner, msg), ownerChain, now); err == nil {
		t.Fatal("owner signature trusted before its CA was registered")
	}
	if _, err := ts.AddOwnerCA(sign.EncodeCertificates(owner.Root)); err != nil {
		t.Fatal(err)
	}
	if r, err := ts.Verify(msg, mustSign(t, owner, msg), ownerChain, now); err != nil || r.Level != cmlv1.TrustLevel_LOCALLY_SIGNED {
		t.Fatalf("owner-signed: %v %v", r, err)
	}
	// The owner CA persists across a reopen; vendor CAs cannot be removed.
	ts2, err := trust.Open(filepath.Join(state, "trust"))
	if err != nil || len(ts2.List()) != 2 {
		t.Fatalf("reopen: %v, %d CAs", err, len(ts2.List()))
	}
	if _, err := ts.RemoveOwnerCA(sign.Fingerprint(vendor.Root)[:16]); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("vendor CA removal: %v", err)
	}
	if _, err := ts.RemoveOwnerCA(sign.Fingerprint(owner.Root)[:16]); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Verify(msg, mustSign(t, owner, msg), ownerChain, now); err == nil {
		t.Fatal("owner signature trusted after its CA was removed")
	}

	// An intermediate CA chain verifies; a revoked intermediate does not.
	inter, interKey := vendor.Issue(t, sign.CertOptions{CommonName: "vendor intermediate", CA: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0)})
	k, _ := sign.GenerateKey("ed25519")
	leaf, err := sign.Issue(inter, interKey, k.Public(), sign.CertOptions{CommonName: "leaf", CodeSigning: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0)})
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := sign.Sign(k, msg)
	chain := sign.EncodeCertificates(leaf, inter)
	if _, err := ts.Verify(msg, sig, chain, now); err != nil {
		t.Fatalf("intermediate chain: %v", err)
	}
	crl, _ := sign.RevocationList(vendor.Root, vendor.RootKey, []*x509.Certificate{inter}, 1, now.Add(-time.Minute), time.Hour)
	if c, err := ts.AddCRL(crl, nil); err != nil || c.Revoked != 1 {
		t.Fatalf("CRL: %v", err)
	}
	if _, err := ts.Verify(msg, sig, chain, now); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked intermediate: %v", err)
	}
	// A CRL claiming to be the vendor root's, signed by someone else.
	forged, _ := sign.RevocationList(vendor.Root, owner.RootKey, []*x509.Certificate{vendor.Signer}, 2, now, time.Hour)
	if _, err := ts.AddCRL(forged, nil); err == nil {
		t.Fatal("forged CRL loaded")
	}
	if _, err := ts.Verify(msg, mustSign(t, vendor, msg), sign.EncodeCertificates(vendor.Signer), now); err != nil {
		t.Fatalf("forged CRL revoked the vendor signer: %v", err)
	}
}

// TestChainWithLoop feeds a chain whose issuer links go round in a circle:
// two CAs with the same names, each signed by the other.
func TestChainWithLoop(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	ts := trust.FromRoots([]*x509.Certificate{p.Root})
	now := time.Now()
	ka, _ := sign.GenerateKey("ecdsa-p256")
	kb, _ := sign.GenerateKey("ecdsa-p256")
	opts := func(cn string) sign.CertOptions {
		return sign.CertOptions{CommonName: cn, CA: true, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}
	}
	// A is issued by B's name and key, B by A's.
	bSelf, _ := sign.Issue(nil, kb, kb.Public(), opts("B"))
	a, _ := sign.Issue(bSelf, kb, ka.Public(), opts("A"))
	b, _ := sign.Issue(a, ka, kb.Public(), opts("B"))
	leafKey, _ := sign.GenerateKey("ecdsa-p256")
	leaf, _ := sign.Issue(a, ka, leafKey.Public(), sign.CertOptions{CommonName: "leaf", CodeSigning: true, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)})
	msg := []byte("x")
	sig, _ := sign.Sign(leafKey, msg)
	_, err := ts.Verify(msg, sig, sign.EncodeCertificates(leaf, a, b), now)
	if err == nil || !strings.Contains(err.Error(), "loop") {
		t.Fatalf("looping chain: %v", err)
	}
}

func TestExtendedKeyUsageRequired(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	ts := trust.FromRoots([]*x509.Certificate{p.Root})
	now := time.Now()
	k, _ := sign.GenerateKey("ecdsa-p256")
	msg := []byte("x")
	sig, _ := sign.Sign(k, msg)
	for name, o := range map[string]sign.CertOptions{
		"TLS server certificate": {ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
		"no extended key usage":  {DigitalSignature: true},
	} {
		o.CommonName, o.NotBefore, o.NotAfter = name, now.Add(-time.Hour), now.Add(time.Hour)
		c, err := sign.Issue(p.Root, p.RootKey, k.Public(), o)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ts.Verify(msg, sig, sign.EncodeCertificates(c), now); err == nil || !strings.Contains(err.Error(), "codeSigning") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
