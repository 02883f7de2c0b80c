package cmlsign

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/asn1"
	"fmt"
	"io"
	"math/big"

	"github.com/miekg/pkcs11"
)

// p11Signer signs with a private key that stays in a PKCS#11 token.
type p11Signer struct {
	ctx  *pkcs11.Ctx
	sess pkcs11.SessionHandle
	key  pkcs11.ObjectHandle
	pub  crypto.PublicKey
}

// OpenPKCS11Signer logs into the first token of module holding a private
// key labelled label and returns a signer for it. pub is the public key of
// the signer's certificate; the key type follows it. Call close when done.
func OpenPKCS11Signer(module, label, pin string, pub crypto.PublicKey) (crypto.Signer, func(), error) {
	ctx := pkcs11.New(module)
	if ctx == nil {
		return nil, nil, fmt.Errorf("cannot load PKCS#11 module %s", module)
	}
	if err := ctx.Initialize(); err != nil {
		ctx.Destroy()
		return nil, nil, fmt.Errorf("PKCS#11 initialize: %w", err)
	}
	fail := func(err error) (crypto.Signer, func(), error) {
		ctx.Finalize()
		ctx.Destroy()
		return nil, nil, err
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return fail(fmt.Errorf("PKCS#11 slots: %w", err))
	}
	for _, slot := range slots {
		sess, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
		if err != nil {
			continue
		}
		if err := ctx.Login(sess, pkcs11.CKU_USER, pin); err != nil && err != pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
			ctx.CloseSession(sess)
			if e, ok := err.(pkcs11.Error); ok && (e == pkcs11.CKR_PIN_INCORRECT || e == pkcs11.CKR_PIN_LOCKED) {
				return fail(fmt.Errorf("PKCS#11 login to slot %d refused: %v", slot, err))
			}
			continue
		}
		tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}
		if err := ctx.FindObjectsInit(sess, tmpl); err != nil {
			ctx.CloseSession(sess)
			continue
		}
		objs, _, err := ctx.FindObjects(sess, 2)
		ctx.FindObjectsFinal(sess)
		if err != nil || len(objs) == 0 {
			ctx.Logout(sess)
			ctx.CloseSession(sess)
			continue
		}
		if len(objs) > 1 {
			return fail(fmt.Errorf("more than one private key labelled %q", label))
		}
		s := &p11Signer{ctx: ctx, sess: sess, key: objs[0], pub: pub}
		return s, func() { ctx.Logout(sess); ctx.CloseSession(sess); ctx.Finalize(); ctx.Destroy() }, nil
	}
	return fail(fmt.Errorf("no private key labelled %q in any token of %s", label, module))
}

func (s *p11Signer) Public() crypto.PublicKey { return s.pub }

// Sign signs a SHA-256 digest: ECDSA (returned as ASN.1 DER, as openssl
// expects) or RSA-PSS.
func (s *p11Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var mech *pkcs11.Mechanism
	switch s.pub.(type) {
	case *ecdsa.PublicKey:
		mech = pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)
	case *rsa.PublicKey:
		if _, ok := opts.(*rsa.PSSOptions); !ok || opts.HashFunc() != crypto.SHA256 {
			return nil, fmt.Errorf("PKCS#11: RSA keys sign with PSS and SHA-256 only")
		}
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.NewPSSParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, 32))
	default:
		return nil, fmt.Errorf("PKCS#11: key type %T is not supported in tokens (use ECDSA or RSA)", s.pub)
	}
	if err := s.ctx.SignInit(s.sess, []*pkcs11.Mechanism{mech}, s.key); err != nil {
		return nil, fmt.Errorf("PKCS#11 sign: %w", err)
	}
	sig, err := s.ctx.Sign(s.sess, digest)
	if err != nil {
		return nil, fmt.Errorf("PKCS#11 sign: %w", err)
	}
	if _, ok := s.pub.(*ecdsa.PublicKey); ok {
		// The token returns r || s; openssl and Go want ASN.1.
		n := len(sig) / 2
		return asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(sig[:n]), new(big.Int).SetBytes(sig[n:])})
	}
	return sig, nil
}
