package token

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"sync"

	"github.com/miekg/pkcs11"
)

// Signer is an ECDSA private key on a PKCS#11 token (a smartcard, an HSM,
// SoftHSM2) as a crypto.Signer: TLS client authentication and
// certificate requests sign on the token; the key never leaves it.
type Signer struct {
	p    *PKCS11
	mu   sync.Mutex // one operation at a time on the session
	sh   pkcs11.SessionHandle
	priv pkcs11.ObjectHandle
	pub  *ecdsa.PublicKey
}

// OpenSigner logs in to the token (module, token label; empty: the first
// with a token) and finds the key pair labelled keyLabel.
func OpenSigner(module, tokenLabel, keyLabel string, pin []byte) (*Signer, error) {
	p := &PKCS11{Module: module, Label: tokenLabel}
	sh, err := p.session(pin)
	if err != nil {
		return nil, err
	}
	s := &Signer{p: p, sh: sh}
	if err := s.find(keyLabel); err != nil {
		p.done(sh)
		return nil, err
	}
	return s, nil
}

// GenerateSigner makes a new P-256 key pair on the token, labelled
// keyLabel: private part sensitive, not extractable, for signing only.
// A key pair with that label already there is refused.
func GenerateSigner(module, tokenLabel, keyLabel string, pin []byte) (*Signer, error) {
	p := &PKCS11{Module: module, Label: tokenLabel}
	sh, err := p.session(pin)
	if err != nil {
		return nil, err
	}
	s := &Signer{p: p, sh: sh}
	if s.find(keyLabel) == nil {
		p.done(sh)
		return nil, fmt.Errorf("the token holds a key labelled %q already", keyLabel)
	}
	oid, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}) // P-256
	pubT := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oid), pkcs11.NewAttribute(pkcs11.CKA_LABEL, keyLabel),
	}
	privT := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false), pkcs11.NewAttribute(pkcs11.CKA_LABEL, keyLabel),
	}
	if _, _, err := p.ctx.GenerateKeyPair(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}, pubT, privT); err != nil {
		p.done(sh)
		return nil, fmt.Errorf("generate a key on the token: %w", err)
	}
	if err := s.find(keyLabel); err != nil {
		p.done(sh)
		return nil, err
	}
	return s, nil
}

func (s *Signer) object(class uint, label string) (pkcs11.ObjectHandle, error) {
	c := s.p.ctx
	if err := c.FindObjectsInit(s.sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
		return 0, err
	}
	objs, _, err := c.FindObjects(s.sh, 2)
	c.FindObjectsFinal(s.sh)
	switch {
	case err != nil:
		return 0, err
	case len(objs) == 0:
		return 0, fmt.Errorf("the token holds no key labelled %q", label)
	case len(objs) > 1:
		return 0, fmt.Errorf("the token holds several keys labelled %q", label)
	}
	return objs[0], nil
}

func (s *Signer) find(label string) error {
	priv, err := s.object(pkcs11.CKO_PRIVATE_KEY, label)
	if err != nil {
		return err
	}
	pubH, err := s.object(pkcs11.CKO_PUBLIC_KEY, label)
	if err != nil {
		return err
	}
	attrs, err := s.p.ctx.GetAttributeValue(s.sh, pubH, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil), pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
	if err != nil {
		return fmt.Errorf("key %q: not an EC key (only ECDSA keys are supported): %w", label, err)
	}
	var oid asn1.ObjectIdentifier
	if _, err := asn1.Unmarshal(attrs[0].Value, &oid); err != nil {
		return fmt.Errorf("key %q: curve: %w", label, err)
	}
	var curve elliptic.Curve
	switch {
	case oid.Equal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}):
		curve = elliptic.P256()
	case oid.Equal(asn1.ObjectIdentifier{1, 3, 132, 0, 34}):
		curve = elliptic.P384()
	default:
		return fmt.Errorf("key %q: curve %v is not supported (P-256, P-384)", label, oid)
	}
	// CKA_EC_POINT is a DER OCTET STRING holding the uncompressed point.
	var point []byte
	if _, err := asn1.Unmarshal(attrs[1].Value, &point); err != nil {
		point = attrs[1].Value
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
	if err != nil {
		return fmt.Errorf("key %q: public point: %w", label, err)
	}
	s.priv, s.pub = priv, pub
	return nil
}

// Public implements crypto.Signer.
func (s *Signer) Public() crypto.PublicKey { return s.pub }

// Sign implements crypto.Signer: ECDSA over the digest on the token,
// returned in ASN.1 form.
func (s *Signer) Sign(_ io.Reader, digest []byte, _ crypto.SignerOpts) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sh == 0 {
		return nil, errors.New("the token session is closed")
	}
	if err := s.p.ctx.SignInit(s.sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, s.priv); err != nil {
		return nil, fmt.Errorf("token sign: %w", err)
	}
	raw, err := s.p.ctx.Sign(s.sh, digest)
	if err != nil {
		return nil, fmt.Errorf("token sign: %w", err)
	}
	if len(raw)%2 != 0 {
		return nil, fmt.Errorf("token sign: odd signature length %d", len(raw))
	}
	n := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:])})
}

// Close logs out of the token.
func (s *Signer) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sh != 0 {
		s.p.done(s.sh)
		s.sh = 0
	}
}
