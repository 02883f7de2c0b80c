package testutil

import (
	"crypto"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/sign"
)

// PKI is a throwaway signing PKI: a root CA and a code-signing certificate
// under it, written to Dir as root-ca.pem, signer.pem and signer.key.
type PKI struct {
	Dir       string
	Root      *x509.Certificate
	RootKey   crypto.Signer
	Signer    *x509.Certificate
	SignerKey crypto.Signer
}

// NewPKI makes a PKI with keys of the given algorithm (see sign.Algorithms).
func NewPKI(t testing.TB, alg, name string) *PKI {
	t.Helper()
	p := &PKI{Dir: t.TempDir()}
	var err error
	if p.RootKey, err = sign.GenerateKey(alg); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if p.Root, err = sign.Issue(nil, p.RootKey, p.RootKey.Public(), sign.CertOptions{CommonName: name + " root CA", CA: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(5, 0, 0)}); err != nil {
		t.Fatal(err)
	}
	p.Signer, p.SignerKey = p.Issue(t, sign.CertOptions{CommonName: name + " signer", CodeSigning: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(1, 0, 0)})
	write := func(n string, b []byte) {
		if err := os.WriteFile(filepath.Join(p.Dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("root-ca.pem", sign.EncodeCertificates(p.Root))
	write("signer.pem", sign.EncodeCertificates(p.Signer))
	if err := sign.WritePrivateKey(filepath.Join(p.Dir, "signer.key"), p.SignerKey); err != nil {
		t.Fatal(err)
	}
	if err := sign.WritePrivateKey(filepath.Join(p.Dir, "root-ca.key"), p.RootKey); err != nil {
		t.Fatal(err)
	}
	return p
}

// Issue issues a certificate under the root for a new ECDSA key.
func (p *PKI) Issue(t testing.TB, o sign.CertOptions) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	k, err := sign.GenerateKey("ecdsa-p256")
	if err != nil {
		t.Fatal(err)
	}
	c, err := sign.Issue(p.Root, p.RootKey, k.Public(), o)
	if err != nil {
		t.Fatal(err)
	}
	return c, k
}

// SignFile signs path with the PKI's signer (path.sig, path.cert).
func (p *PKI) SignFile(t testing.TB, path string) {
	t.Helper()
	if err := sign.SignFile(path, p.SignerKey, []*x509.Certificate{p.Signer}); err != nil {
		t.Fatal(err)
	}
}

// Provision makes the PKI's root a vendor CA of the daemon state in stateDir.
func (p *PKI) Provision(t testing.TB, stateDir string) {
	t.Helper()
	dir := filepath.Join(stateDir, "trust", "vendor")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "vendor.pem"), sign.EncodeCertificates(p.Root), 0o600); err != nil {
		t.Fatal(err)
	}
}
