package tpm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// Persistent handles of CML's keys, in the owner range TCG leaves to
// applications. Documented in docs/attestation.md.
const (
	PrimaryHandle     tpmutil.Handle = 0x81000C10 // storage primary (ECC P-256)
	AttestationHandle tpmutil.Handle = 0x81000C11 // restricted signing key
	TLSHandle         tpmutil.Handle = 0x81000C12 // unrestricted signing key for TLS
)

// Keys are the device's TPM-resident identity keys. Their private parts
// never leave the TPM: they are created in it (sensitiveDataOrigin) and
// cannot be duplicated (fixedTPM, fixedParent).
type Keys struct {
	rw          io.ReadWriter
	Attestation *client.Key
	TLS         *client.Key
}

func attestationTemplate() tpm2.Public { return client.AKTemplateECC() }

func tlsTemplate() tpm2.Public {
	return tpm2.Public{
		Type:    tpm2.AlgECC,
		NameAlg: tpm2.AlgSHA256,
		Attributes: tpm2.FlagSign | tpm2.FlagFixedTPM | tpm2.FlagFixedParent |
			tpm2.FlagSensitiveDataOrigin | tpm2.FlagUserWithAuth,
		ECCParameters: &tpm2.ECCParams{
			Sign:    &tpm2.SigScheme{Alg: tpm2.AlgECDSA, Hash: tpm2.AlgSHA256},
			CurveID: tpm2.CurveNISTP256,
		},
	}
}

// EnsureKeys loads the identity keys, creating the primary key and both
// children on first use and persisting them. A key found at one of CML's
// handles that does not match its template is refused, never replaced: a
// replaced key would silently change the device's identity.
func EnsureKeys(rw io.ReadWriter) (*Keys, error) {
	if _, err := ensure(rw, PrimaryHandle, client.SRKTemplateECC(), 0); err != nil {
		return nil, fmt.Errorf("storage primary key: %w", err)
	}
	ak, err := ensure(rw, AttestationHandle, attestationTemplate(), PrimaryHandle)
	if err != nil {
		return nil, fmt.Errorf("attestation key: %w", err)
	}
	tls, err := ensure(rw, TLSHandle, tlsTemplate(), PrimaryHandle)
	if err != nil {
		return nil, fmt.Errorf("TLS key: %w", err)
	}
	return &Keys{rw: rw, Attestation: ak, TLS: tls}, nil
}

func ensure(rw io.ReadWriter, h tpmutil.Handle, tmpl tpm2.Public, parent tpmutil.Handle) (*client.Key, error) {
	pub, _, _, err := tpm2.ReadPublic(rw, h)
	if err == nil {
		if !pub.MatchesTemplate(tmpl) {
			return nil, fmt.Errorf("handle %#x holds a key that is not CML's (refusing to replace it)", uint32(h))
		}
		return client.LoadCachedKey(rw, h, client.NullSession{})
	}
	var loaded tpmutil.Handle
	if parent == 0 {
		loaded, _, err = tpm2.CreatePrimary(rw, tpm2.HandleOwner, tpm2.PCRSelection{}, "", "", tmpl)
		if err != nil {
			return nil, err
		}
	} else {
		priv, pubBlob, _, _, _, err := tpm2.CreateKey(rw, parent, tpm2.PCRSelection{}, "", "", tmpl)
		if err != nil {
			return nil, err
		}
		if loaded, _, err = tpm2.Load(rw, parent, "", pubBlob, priv); err != nil {
			return nil, err
		}
	}
	defer tpm2.FlushContext(rw, loaded)
	if err := tpm2.EvictControl(rw, "", tpm2.HandleOwner, loaded, h); err != nil {
		// Another process made the same key meanwhile: use that one.
		if pub, _, _, rerr := tpm2.ReadPublic(rw, h); rerr == nil && pub.MatchesTemplate(tmpl) {
			return client.LoadCachedKey(rw, h, client.NullSession{})
		}
		return nil, fmt.Errorf("persist at %#x: %w", uint32(h), err)
	}
	return client.LoadCachedKey(rw, h, client.NullSession{})
}

// Subject is what a device certificate names.
type Subject struct {
	DeviceUUID string // URI SAN urn:uuid:<uuid>
	CommonName string // "<product> <serial>"
}

func (s Subject) uri() (*url.URL, error) {
	return url.Parse("urn:uuid:" + s.DeviceUUID)
}

// TLSCSR returns a DER certificate request for the TLS key, signed by it,
// asking for clientAuth.
func (k *Keys) TLSCSR(s Subject) ([]byte, error) {
	signer, err := k.TLS.GetSigner()
	if err != nil {
		return nil, err
	}
	return x509.CreateCertificateRequest(rand.Reader, csrTemplate(s, s.CommonName, x509.ExtKeyUsageClientAuth), signer)
}

// AttestationCSR returns a DER certificate request for the attestation
// key. A restricted key signs only data the TPM hashed itself (and refuses
// data that looks like a TPM attestation), so the request's signature is
// made with TPM2_Hash and a ticket, not over a digest Go computed.
func (k *Keys) AttestationCSR(s Subject) ([]byte, error) {
	// Lay the request out with a throwaway software key (x509 insists on
	// a signature it can verify), then put the attestation key's public
	// key into it and have the TPM sign it.
	tmp, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	draft, err := x509.CreateCertificateRequest(rand.Reader, csrTemplate(s, s.CommonName+" attestation", 0), tmp)
	if err != nil {
		return nil, err
	}
	var c struct {
		TBS asn1.RawValue
		Alg pkix.AlgorithmIdentifier
		Sig asn1.BitString
	}
	if _, err := asn1.Unmarshal(draft, &c); err != nil {
		return nil, err
	}
	var info struct {
		Version    int
		Subject    asn1.RawValue
		PublicKey  asn1.RawValue
		Attributes asn1.RawValue
	}
	if _, err := asn1.Unmarshal(c.TBS.FullBytes, &info); err != nil {
		return nil, err
	}
	spki, err := x509.MarshalPKIXPublicKey(k.Attestation.PublicKey())
	if err != nil {
		return nil, err
	}
	info.PublicKey = asn1.RawValue{FullBytes: spki}
	tbs, err := asn1.Marshal(info)
	if err != nil {
		return nil, err
	}
	sig, err := k.Attestation.SignData(tbs)
	if err != nil {
		return nil, fmt.Errorf("sign with the attestation key: %w", err)
	}
	c.TBS = asn1.RawValue{FullBytes: tbs}
	c.Sig = asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}
	der, err := asn1.Marshal(c)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("attestation CSR does not verify: %w", err)
	}
	return der, nil
}

func csrTemplate(s Subject, cn string, eku x509.ExtKeyUsage) *x509.CertificateRequest {
	t := &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}, SignatureAlgorithm: x509.ECDSAWithSHA256}
	if u, err := s.uri(); err == nil {
		t.URIs = []*url.URL{u}
	}
	if eku != 0 {
		// Ask for the extended key usage in the request's extensions.
		val, _ := asn1.Marshal([]asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 2}})
		t.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 37}, Value: val}}
	}
	return t
}

// SelfSigned returns a self-signed certificate for the TLS key, used until
// a fleet CA's certificate is installed.
func (k *Keys) SelfSigned(s Subject, now time.Time) ([]byte, error) {
	signer, err := k.TLS.GetSigner()
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	u, err := s.uri()
	if err != nil {
		return nil, err
	}
	t := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: s.CommonName + " (not provisioned)"},
		URIs:         []*url.URL{u},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(20, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return x509.CreateCertificate(rand.Reader, t, t, signer.Public(), signer)
}

// KeyFor names which identity key a certificate certifies: "tls",
// "attestation", or an error when it is neither.
func (k *Keys) KeyFor(cert *x509.Certificate) (string, error) {
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return "", errors.New("certificate is not for an ECDSA key of this device")
	}
	switch {
	case pub.Equal(k.TLS.PublicKey()):
		return "tls", nil
	case pub.Equal(k.Attestation.PublicKey()):
		return "attestation", nil
	}
	return "", errors.New("certificate's public key is neither this device's TLS key nor its attestation key")
}

// Quote is a TPM2_Quote by the attestation key.
type Quote struct {
	Attest    []byte         // TPMS_ATTEST, as signed
	Signature []byte         // TPMT_SIGNATURE, as the TPM returned it
	PCRs      map[int][]byte // SHA-256 bank values of the quoted PCRs
}

// Quote has the TPM sign the selected SHA-256 PCRs and nonce.
func (k *Keys) Quote(nonce []byte, pcrs []int) (*Quote, error) {
	sel := tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: pcrs}
	q, err := k.Attestation.Quote(sel, nonce)
	if err != nil {
		return nil, err
	}
	out := &Quote{Attest: q.Quote, Signature: q.RawSig, PCRs: map[int][]byte{}}
	for i, v := range q.Pcrs.Pcrs {
		out.PCRs[int(i)] = v
	}
	return out, nil
}
