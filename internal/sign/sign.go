// Package sign makes and checks CML's detached signatures and the keys and
// certificates behind them. It is shared by the signing tool (cmlsign) and
// the daemon's trust store.
//
// A signature covers the exact bytes of a file (a guest OS manifest or a
// container config) and is what stock openssl makes and checks:
//
//	ECDSA P-256/P-384  SHA-256, ASN.1 DER    openssl dgst -sha256 -verify pub.pem -signature f.sig f
//	RSA >= 3072        SHA-256, PSS, salt 32 openssl dgst -sha256 -sigopt rsa_padding_mode:pss -verify pub.pem -signature f.sig f
//	Ed25519            pure Ed25519          openssl pkeyutl -verify -pubin -inkey pub.pem -rawin -in f -sigfile f.sig
//
// Other algorithms and RSA keys under 3072 bits are refused on both sides.
package sign

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/errdefs"
)

// Algorithms lists the key algorithms CML signs with, as cmlsign names them.
var Algorithms = []string{"ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072", "rsa-4096"}

// MaxChainSize bounds a certificate chain file; MaxChainCerts the
// certificates in it.
const (
	MaxChainSize  = 64 << 10
	MaxChainCerts = 8
	// MaxSignatureSize bounds a signature file (RSA-8192 is 1 KiB).
	MaxSignatureSize = 2048
)

// SigSuffix and CertSuffix name a file's detached signature and the
// signer's certificate chain next to it.
const (
	SigSuffix  = ".sig"
	CertSuffix = ".cert"
)

// GenerateKey makes a private key of the named algorithm.
func GenerateKey(alg string) (crypto.Signer, error) {
	switch alg {
	case "ecdsa-p256":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ecdsa-p384":
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "ed25519":
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	case "rsa-3072":
		return rsa.GenerateKey(rand.Reader, 3072)
	case "rsa-4096":
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, errdefs.InvalidArgument("algorithm %q is not one of %s", alg, strings.Join(Algorithms, ", "))
}

// CheckPublicKey refuses key types and sizes CML does not accept.
func CheckPublicKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return errdefs.InvalidArgument("ECDSA curve %s is not accepted (P-256, P-384)", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 3072 {
			return errdefs.InvalidArgument("RSA key of %d bits is too short (at least 3072)", k.N.BitLen())
		}
	default:
		return errdefs.InvalidArgument("key type %T is not accepted", pub)
	}
	return nil
}

// Sign signs msg with s as the table in the package comment says.
func Sign(s crypto.Signer, msg []byte) ([]byte, error) {
	if err := CheckPublicKey(s.Public()); err != nil {
		return nil, err
	}
	switch s.Public().(type) {
	case ed25519.PublicKey:
		return s.Sign(rand.Reader, msg, crypto.Hash(0))
	case *rsa.PublicKey:
		d := sha256.Sum256(msg)
		return s.Sign(rand.Reader, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
	default:
		d := sha256.Sum256(msg)
		return s.Sign(rand.Reader, d[:], crypto.SHA256)
	}
}

// Verify checks sig over msg with pub.
func Verify(pub crypto.PublicKey, msg, sig []byte) error {
	if err := CheckPublicKey(pub); err != nil {
		return err
	}
	ok := false
	d := sha256.Sum256(msg)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, d[:], sig)
	case ed25519.PublicKey:
		ok = ed25519.Verify(k, msg, sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPSS(k, crypto.SHA256, d[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto}) == nil
	}
	if !ok {
		return errdefs.Integrity("signature does not match the signed file")
	}
	return nil
}

// ParsePrivateKey parses a PEM private key: PKCS#8 (openssl genpkey), SEC1
// EC or PKCS#1 RSA. Encrypted keys are refused: use a token for keys that
// need a PIN.
func ParsePrivateKey(b []byte) (crypto.Signer, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, errdefs.InvalidArgument("no PEM private key found")
		}
		var k any
		var err error
		switch blk.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errdefs.InvalidArgument("encrypted private keys are not supported; keep protected keys in a PKCS#11 token")
		default:
			continue // e.g. EC PARAMETERS before the key
		}
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "private key")
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, errdefs.InvalidArgument("private key of type %T cannot sign", k)
		}
		return s, CheckPublicKey(s.Public())
	}
}

// WritePrivateKey writes k as PKCS#8 PEM, mode 0600.
func WritePrivateKey(path string, k crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

// PublicKeyPEM returns pub as a PEM SubjectPublicKeyInfo (what openssl's
// -verify and -pubin take).
func PublicKeyPEM(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParseCertificates parses a PEM certificate chain, refusing anything that
// is not a certificate and more than MaxChainCerts of them.
func ParseCertificates(b []byte) ([]*x509.Certificate, error) {
	if len(b) > MaxChainSize {
		return nil, errdefs.InvalidArgument("certificate chain of %d bytes is larger than %d", len(b), MaxChainSize)
	}
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, errdefs.InvalidArgument("certificate chain holds a %q block", blk.Type)
		}
		if len(out) == MaxChainCerts {
			return nil, errdefs.InvalidArgument("certificate chain has more than %d certificates", MaxChainCerts)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "certificate %d", len(out)+1)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errdefs.InvalidArgument("no PEM certificate found")
	}
	return out, nil
}

// EncodeCertificates returns certs as PEM.
func EncodeCertificates(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// Fingerprint is the SHA-256 of a certificate's DER, lower-case hex.
func Fingerprint(c *x509.Certificate) string {
	s := sha256.Sum256(c.Raw)
	return hex.EncodeToString(s[:])
}

// CertOptions describes a certificate to issue.
type CertOptions struct {
	CommonName   string
	Organization string
	CA           bool
	// CodeSigning makes a software-signing certificate: KeyUsage
	// digitalSignature, ExtKeyUsage codeSigning.
	CodeSigning bool
	// ExtKeyUsage and DigitalSignature make other end-entity certificates
	// (e.g. TLS: digitalSignature with serverAuth).
	ExtKeyUsage      []x509.ExtKeyUsage
	DigitalSignature bool
	// AttestationKey marks a TPM attestation key's certificate: KeyUsage
	// digitalSignature, ExtKeyUsage tcg-kp-AIKCertificate.
	AttestationKey bool
	// URIs are URI subject alternative names (a device's urn:uuid:…).
	URIs      []*url.URL
	NotBefore time.Time
	NotAfter  time.Time
}

// OIDAttestationKey is TCG's extended key usage for attestation key
// certificates (tcg-kp-AIKCertificate).
var OIDAttestationKey = asn1.ObjectIdentifier{2, 23, 133, 8, 3}

// Issue issues a certificate for pub, signed by parentKey under parent, or
// self-signed when parent is nil.
func Issue(parent *x509.Certificate, parentKey crypto.Signer, pub crypto.PublicKey, o CertOptions) (*x509.Certificate, error) {
	if err := CheckPublicKey(pub); err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: o.CommonName},
		NotBefore:    o.NotBefore,
		NotAfter:     o.NotAfter,
	}
	if o.Organization != "" {
		tmpl.Subject.Organization = []string{o.Organization}
	}
	if o.CA {
		tmpl.IsCA = true
		tmpl.BasicConstraintsValid = true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	}
	if o.CodeSigning {
		tmpl.BasicConstraintsValid = true
		tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}
	}
	if o.DigitalSignature || len(o.ExtKeyUsage) > 0 {
		tmpl.BasicConstraintsValid = true
		tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, o.ExtKeyUsage...)
	}
	if o.AttestationKey {
		tmpl.BasicConstraintsValid = true
		tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
		tmpl.UnknownExtKeyUsage = []asn1.ObjectIdentifier{OIDAttestationKey}
	}
	tmpl.URIs = o.URIs
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// RevocationList makes a CRL from ca revoking the given certificates;
// number must grow with every CRL the CA issues.
func RevocationList(ca *x509.Certificate, caKey crypto.Signer, revoked []*x509.Certificate, number int64, now time.Time, validity time.Duration) ([]byte, error) {
	tmpl := &x509.RevocationList{Number: big.NewInt(number), ThisUpdate: now, NextUpdate: now.Add(validity)}
	for _, c := range revoked {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: now})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, ca, caKey)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), nil
}

// ParseRevocationList parses one PEM or DER CRL.
func ParseRevocationList(b []byte) (*x509.RevocationList, error) {
	if len(b) > 4<<20 {
		return nil, errdefs.InvalidArgument("CRL of %d bytes is too large", len(b))
	}
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != "X509 CRL" {
			return nil, errdefs.InvalidArgument("PEM block %q is not an X509 CRL", blk.Type)
		}
		b = blk.Bytes
	}
	crl, err := x509.ParseRevocationList(b)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "CRL")
	}
	return crl, nil
}

// SignFile signs the file at path, writing path.sig and path.cert (the
// chain, leaf first). It checks the signature with the chain's leaf before
// writing, so a key that does not match its certificate fails here and not
// on the device.
func SignFile(path string, s crypto.Signer, chain []*x509.Certificate) error {
	msg, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	sig, err := Sign(s, msg)
	if err != nil {
		return err
	}
	if len(chain) == 0 {
		return errors.New("no signer certificate")
	}
	if err := Verify(chain[0].PublicKey, msg, sig); err != nil {
		return fmt.Errorf("the signing key does not match the certificate %q", chain[0].Subject.CommonName)
	}
	if err := atomicfile.Write(path+SigSuffix, sig, 0o644); err != nil {
		return err
	}
	return atomicfile.Write(path+CertSuffix, EncodeCertificates(chain...), 0o644)
}
