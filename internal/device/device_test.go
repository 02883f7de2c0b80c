package device

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/tpm"
	"github.com/cmlproject/cml/internal/tpmtest"
)

func open(t *testing.T) (*Identity, *tpm.Keys, string) {
	t.Helper()
	c := tpmtest.Simulator(t)
	keys, err := tpm.EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	m, err := tpm.NewMeasurer(c, tpm.DefaultPCR, filepath.Join(dir, "log.cel"))
	if err != nil {
		t.Fatal(err)
	}
	sink, err := audit.OpenFile(filepath.Join(dir, "audit.log"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sink.Close() })
	id, err := Open(Options{Dir: filepath.Join(dir, "identity"), Keys: keys, Measurer: m, Audit: sink})
	if err != nil {
		t.Fatal(err)
	}
	return id, keys, filepath.Join(dir, "identity")
}

// TestInstallCertRefusals offers certificates an operator could get wrong
// or an attacker could slip in; each is refused with one line naming the
// problem, and the identity on disk stays as it was.
func TestInstallCertRefusals(t *testing.T) {
	id, keys, dir := open(t)
	fleet := testutil.NewPKI(t, "ecdsa-p256", "fleet")
	other := testutil.NewPKI(t, "ecdsa-p256", "other")
	now := time.Now()
	mine, _ := url.Parse("urn:uuid:" + id.UUID())
	theirs, _ := url.Parse("urn:uuid:00000000-0000-4000-8000-000000000000")
	issue := func(ca *testutil.PKI, pub any, o sign.CertOptions) []byte {
		if o.NotAfter.IsZero() {
			o.NotBefore, o.NotAfter = now.Add(-time.Hour), now.AddDate(1, 0, 0)
		}
		c, err := sign.Issue(ca.Root, ca.RootKey, pub, o)
		if err != nil {
			t.Fatal(err)
		}
		return sign.EncodeCertificates(c)
	}
	tlsPub := keys.TLS.PublicKey()
	_, stranger := fleet.Issue(t, sign.CertOptions{CommonName: "x", DigitalSignature: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0)})
	selfDER, _ := keys.SelfSigned(tpm.Subject{DeviceUUID: id.UUID(), CommonName: "self"}, now)
	clientAuth := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	cases := []struct {
		name, want string
		pem        []byte
	}{
		{"another key", "neither this device's TLS key nor its attestation key", issue(fleet, stranger.Public(), sign.CertOptions{CommonName: "d", URIs: []*url.URL{mine}, ExtKeyUsage: clientAuth})},
		{"another device's UUID", "does not name this device", issue(fleet, tlsPub, sign.CertOptions{CommonName: "d", URIs: []*url.URL{theirs}, ExtKeyUsage: clientAuth})},
		{"expired", "is not valid now", issue(fleet, tlsPub, sign.CertOptions{CommonName: "d", URIs: []*url.URL{mine}, ExtKeyUsage: clientAuth, NotBefore: now.AddDate(-2, 0, 0), NotAfter: now.AddDate(-1, 0, 0)})},
		{"no clientAuth", "lacks the clientAuth", issue(fleet, tlsPub, sign.CertOptions{CommonName: "d", URIs: []*url.URL{mine}, DigitalSignature: true})},
		{"self-signed", "self-signed", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: selfDER})},
		{"broken chain", "is not signed by the next certificate", append(issue(fleet, tlsPub, sign.CertOptions{CommonName: "d", URIs: []*url.URL{mine}, ExtKeyUsage: clientAuth}), sign.EncodeCertificates(other.Root)...)},
		{"not PEM", "device certificate", []byte("hello")},
	}
	before, _ := os.ReadFile(filepath.Join(dir, tlsFile))
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := id.InstallCert(context.Background(), c.pem, false)
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("got %v, want an invalid-argument error mentioning %q", err, c.want)
			}
		})
	}
	if after, _ := os.ReadFile(filepath.Join(dir, tlsFile)); string(after) != string(before) {
		t.Fatal("a refused certificate changed the stored identity")
	}
	// The genuine one goes in; after provisioning only with replace.
	good := issue(fleet, tlsPub, sign.CertOptions{CommonName: "d", URIs: []*url.URL{mine}, ExtKeyUsage: clientAuth})
	if err := id.InstallCert(context.Background(), good, false); err != nil {
		t.Fatal(err)
	}
	if err := id.Provisioned(context.Background()); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("provisioned without an attestation certificate: %v", err)
	}
	ak := issue(fleet, keys.Attestation.PublicKey(), sign.CertOptions{CommonName: "d", URIs: []*url.URL{mine}, AttestationKey: true})
	if err := id.InstallCert(context.Background(), ak, false); err != nil {
		t.Fatal(err)
	}
	if err := id.Provisioned(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := id.InstallCert(context.Background(), good, false); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("identity changed after provisioning without replace: %v", err)
	}
	if err := id.InstallCert(context.Background(), good, true); err != nil {
		t.Fatal(err)
	}
	// Nonces out of bounds and PCRs that do not exist.
	for _, n := range [][]byte{nil, make([]byte, MinNonce-1), make([]byte, MaxNonce+1)} {
		if _, err := id.Attest(n, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("nonce of %d bytes: %v", len(n), err)
		}
	}
	if _, err := id.Attest(make([]byte, 16), []uint32{24}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("PCR 24: %v", err)
	}
	if a, err := id.Attest(make([]byte, 16), []uint32{0, 11, 0}); err != nil || len(a.GetPcrs()) != 2 {
		t.Errorf("PCRs 0 and 11: %v %v", a.GetPcrs(), err)
	}
}
