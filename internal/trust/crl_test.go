package trust_test

import (
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/trust"
)

func openStore(t *testing.T, p *testutil.PKI) (*trust.Store, string) {
	t.Helper()
	state := t.TempDir()
	p.Provision(t, state)
	dir := filepath.Join(state, "trust")
	ts, err := trust.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ts, dir
}

// Item 5: CRLs from CAs the device does not trust are refused, so they
// can neither fill the store nor crowd out the vendor's genuine CRL.
func TestCRLPoisoningRefused(t *testing.T) {
	vendor := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	ts, dir := openStore(t, vendor)
	now := time.Now()
	for i := 0; i < 6; i++ {
		stranger := testutil.NewPKI(t, "ecdsa-p256", "stranger")
		crl, _ := sign.RevocationList(stranger.Root, stranger.RootKey, nil, 1, now, time.Hour)
		if _, err := ts.AddCRL(crl, nil); !errors.Is(err, errdefs.ErrIntegrity) {
			t.Fatalf("CRL %d of an untrusted CA: %v", i, err)
		}
	}
	if n := len(ts.CRLs()); n != 0 {
		t.Fatalf("%d CRLs stored from untrusted CAs", n)
	}
	genuine, _ := sign.RevocationList(vendor.Root, vendor.RootKey, []*x509.Certificate{vendor.Signer}, 1, now.Add(-time.Minute), time.Hour)
	if _, err := ts.AddCRL(genuine, nil); err != nil {
		t.Fatalf("the vendor's CRL: %v", err)
	}
	// A CRL file planted in the directory by someone with write access
	// but no trusted key has no effect after a restart.
	stranger := testutil.NewPKI(t, "ecdsa-p256", "planted")
	planted, _ := sign.RevocationList(stranger.Root, stranger.RootKey, nil, 1, now, time.Hour)
	os.WriteFile(filepath.Join(dir, "crl", "planted.pem"), planted, 0o600)
	ts2, err := trust.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if l := ts2.CRLs(); len(l) != 1 || l[0].Issuer != vendor.Root.Subject.String() {
		t.Errorf("after reopening: %+v", l)
	}
}

// One CRL per issuer: a newer number replaces, an older or equal one is
// refused (no un-revoking by replaying an old CRL), the same CRL again is
// fine; an intermediate's CRL needs its chain; removal by fingerprint
// prefix or issuer, kept across a reopen.
func TestCRLPerIssuerReplaceAndRemove(t *testing.T) {
	vendor := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	ts, dir := openStore(t, vendor)
	now := time.Now()
	crl := func(n int64, revoked ...*x509.Certificate) []byte {
		b, _ := sign.RevocationList(vendor.Root, vendor.RootKey, revoked, n, now.Add(-time.Minute), time.Hour)
		return b
	}
	if _, err := ts.AddCRL(crl(5, vendor.Signer), nil); err != nil {
		t.Fatal(err)
	}
	first := crl(6, vendor.Signer)
	if _, err := ts.AddCRL(first, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.AddCRL(first, nil); err != nil {
		t.Errorf("loading the stored CRL again: %v", err)
	}
	if _, err := ts.AddCRL(crl(4), nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("older CRL number: %v", err)
	}
	if l := ts.CRLs(); len(l) != 1 || l[0].Number != "6" || l[0].Revoked != 1 {
		t.Errorf("store: %+v", l)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "crl")); len(ents) != 1 {
		t.Errorf("%d CRL files, want 1", len(ents))
	}

	inter, interKey := vendor.Issue(t, sign.CertOptions{CommonName: "vendor intermediate", CA: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0)})
	icrl, _ := sign.RevocationList(inter, interKey, nil, 1, now.Add(-time.Minute), time.Hour)
	if _, err := ts.AddCRL(icrl, nil); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("intermediate CRL without its chain: %v", err)
	}
	if _, err := ts.AddCRL(icrl, sign.EncodeCertificates(inter)); err != nil {
		t.Errorf("intermediate CRL with its chain: %v", err)
	}
	ts2, _ := trust.Open(dir)
	if n := len(ts2.CRLs()); n != 2 {
		t.Errorf("%d CRLs after reopening, want 2", n)
	}
	for _, c := range ts2.CRLs() {
		if c.Issuer == vendor.Root.Subject.String() {
			if _, err := ts2.RemoveCRL(c.Fingerprint[:12]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := ts2.RemoveCRL(inter.Subject.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := ts2.RemoveCRL("deadbeef"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("removing an unknown CRL: %v", err)
	}
	ts3, _ := trust.Open(dir)
	if n := len(ts3.CRLs()); n != 0 {
		t.Errorf("%d CRLs after removing both", n)
	}
}
