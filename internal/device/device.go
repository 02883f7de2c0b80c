// Package device holds the device's identity and answers attestation
// challenges: the TPM-resident TLS and attestation keys, the certificates
// a fleet CA issued for them, the provisioning state, and Attest, which
// returns a quote together with the measurement log and certificates.
//
// It does not verify attestations (package attest does, off the device)
// and does not serve TLS itself (the remote management endpoint will use
// the TLS key through it).
package device

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/tpm"
)

// Files in the identity directory.
const (
	uuidFile        = "device-uuid"
	tlsFile         = "tls.pem"
	attestationFile = "attestation.pem"
	provisionedFile = "provisioned"
)

// certFile maps each key (as tpm.Keys.KeyFor names it) to the file
// holding its certificate chain.
var certFile = map[string]string{"tls": tlsFile, "attestation": attestationFile}

// Nonce bounds: short nonces can be guessed ahead, long ones are abuse.
const (
	MinNonce = 8
	MaxNonce = 64
)

var uuidPattern = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// Options configure an Identity.
type Options struct {
	Dir         string // <state>/identity, created 0700
	Keys        *tpm.Keys
	Measurer    *tpm.Measurer
	TPM         string // names the TPM in status output
	ProductName string
	Serial      string // default: the device UUID
	Audit       audit.Recorder
	Now         func() time.Time
}

// Identity is the device's identity and provisioning state.
type Identity struct {
	o           Options
	uuid        string
	mu          sync.Mutex
	tls, ak     []byte // PEM chains, leaf first
	selfSigned  bool
	provisioned bool
}

// Open loads the identity, creating the device UUID and a self-signed TLS
// certificate on first start. A stored certificate whose key is not the
// TPM's is refused: the TPM was cleared or swapped, and the device must be
// re-provisioned on purpose, not silently.
func Open(o Options) (*Identity, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.ProductName == "" {
		o.ProductName = "CML device"
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	id := &Identity{o: o}
	b, err := os.ReadFile(filepath.Join(o.Dir, uuidFile))
	switch {
	case err == nil:
		id.uuid = string(b)
		if !uuidPattern.MatchString(id.uuid) {
			return nil, fmt.Errorf("device identity: %s is not a UUID", filepath.Join(o.Dir, uuidFile))
		}
	case errors.Is(err, os.ErrNotExist):
		id.uuid = newUUID()
		if err := atomicfile.Write(filepath.Join(o.Dir, uuidFile), []byte(id.uuid), 0o644); err != nil {
			return nil, err
		}
	default:
		return nil, err
	}
	if o.Serial == "" {
		id.o.Serial = id.uuid
	}
	for key, dst := range map[string]*[]byte{"tls": &id.tls, "attestation": &id.ak} {
		name := certFile[key]
		b, err := os.ReadFile(filepath.Join(o.Dir, name))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		certs, err := sign.ParseCertificates(b)
		if err != nil {
			return nil, fmt.Errorf("device identity %s: %w", name, err)
		}
		which, err := o.Keys.KeyFor(certs[0])
		if err != nil || which != key {
			return nil, fmt.Errorf("device identity %s does not match the TPM's key (TPM cleared or replaced?); move %s away to provision the device again", name, o.Dir)
		}
		*dst = b
	}
	if id.tls == nil {
		der, err := o.Keys.SelfSigned(id.subject(), o.Now())
		if err != nil {
			return nil, fmt.Errorf("self-signed device certificate: %w", err)
		}
		id.tls = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		if err := atomicfile.Write(filepath.Join(o.Dir, tlsFile), id.tls, 0o644); err != nil {
			return nil, err
		}
	}
	id.selfSigned = isSelfSigned(id.tls)
	_, err = os.Stat(filepath.Join(o.Dir, provisionedFile))
	id.provisioned = err == nil
	return id, nil
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func isSelfSigned(chain []byte) bool {
	certs, err := sign.ParseCertificates(chain)
	if err != nil || len(certs) != 1 {
		return false
	}
	return selfSigned(certs[0])
}

// selfSigned reports whether c is signed by its own key (x509's
// CheckSignatureFrom would insist that the signer be a CA).
func selfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

func (id *Identity) subject() tpm.Subject {
	return tpm.Subject{DeviceUUID: id.uuid, CommonName: id.o.ProductName + " " + id.o.Serial}
}

// UUID is the device's UUID.
func (id *Identity) UUID() string { return id.uuid }

// Info reports the identity and provisioning state.
func (id *Identity) Info() *cmlv1.DeviceIdentity {
	id.mu.Lock()
	defer id.mu.Unlock()
	// Copies, not pointers to the fields: the message is marshalled after
	// the lock is released, while InstallCert may change them.
	return &cmlv1.DeviceIdentity{
		DeviceUuid: ptr(id.uuid), CommonName: ptr(id.subject().CommonName),
		Provisioned: ptr(id.provisioned), TlsCertificate: id.tls, TlsSelfSigned: ptr(id.selfSigned),
		AttestationCertificate: id.ak, Tpm: ptr(id.o.TPM), MeasurementPcr: ptr(uint32(id.o.Measurer.PCR())),
	}
}

func ptr[T any](v T) *T { return &v }

// CSR returns a PEM certificate request for one of the keys.
func (id *Identity) CSR(key cmlv1.DeviceCSRRequest_Key) ([]byte, error) {
	var der []byte
	var err error
	switch key {
	case cmlv1.DeviceCSRRequest_TLS:
		der, err = id.o.Keys.TLSCSR(id.subject())
	case cmlv1.DeviceCSRRequest_ATTESTATION:
		der, err = id.o.Keys.AttestationCSR(id.subject())
	default:
		return nil, errdefs.InvalidArgument("unknown key %v", key)
	}
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// InstallCert installs an issued certificate (with its intermediates) for
// the key it certifies. It must be valid now, name this device's UUID,
// carry clientAuth when it is for the TLS key, and form a chain. After
// provisioning ended, replace must be set; the change is audited either way.
func (id *Identity) InstallCert(ctx context.Context, pemBytes []byte, replace bool) error {
	certs, err := sign.ParseCertificates(pemBytes)
	if err != nil {
		return errdefs.InvalidArgument("device certificate: %v", err)
	}
	leaf := certs[0]
	which, err := id.o.Keys.KeyFor(leaf)
	if err != nil {
		return errdefs.InvalidArgument("device certificate %q: %v", leaf.Subject.CommonName, err)
	}
	now := id.o.Now()
	for _, c := range certs {
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return errdefs.InvalidArgument("device certificate: %q is not valid now (valid %s to %s)", c.Subject.CommonName, c.NotBefore.Format(time.RFC3339), c.NotAfter.Format(time.RFC3339))
		}
	}
	for i := 0; i+1 < len(certs); i++ {
		if err := certs[i].CheckSignatureFrom(certs[i+1]); err != nil {
			return errdefs.InvalidArgument("device certificate: %q is not signed by the next certificate %q", certs[i].Subject.CommonName, certs[i+1].Subject.CommonName)
		}
	}
	if selfSigned(leaf) {
		return errdefs.InvalidArgument("device certificate: a self-signed certificate is not a fleet CA's")
	}
	if !slices.ContainsFunc(leaf.URIs, func(u *url.URL) bool { return u.String() == "urn:uuid:"+id.uuid }) {
		return errdefs.InvalidArgument("device certificate %q does not name this device (URI SAN urn:uuid:%s)", leaf.Subject.CommonName, id.uuid)
	}
	if which == "tls" && !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return errdefs.InvalidArgument("device certificate %q for the TLS key lacks the clientAuth extended key usage", leaf.Subject.CommonName)
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.provisioned && !replace {
		return errdefs.FailedPrecondition("device is provisioned: replacing its %s certificate needs the replace step (cmlctl device cert --replace), which is audited", which)
	}
	out := sign.EncodeCertificates(certs...)
	if err := atomicfile.Write(filepath.Join(id.o.Dir, certFile[which]), out, 0o644); err != nil {
		return err
	}
	op := "device.cert.install"
	if id.provisioned {
		op = "device.cert.replace"
	}
	id.o.Audit.Record(ctx, audit.Event{Type: "device", Operation: op, Outcome: audit.Success, Object: which,
		Details: fmt.Sprintf("subject %q, issuer %q, fingerprint %s", leaf.Subject.CommonName, leaf.Issuer.CommonName, sign.Fingerprint(leaf))})
	if which == "tls" {
		id.tls, id.selfSigned = out, false
	} else {
		id.ak = out
	}
	return nil
}

// Provisioned ends provisioning; both keys need a fleet CA's certificate.
func (id *Identity) Provisioned(ctx context.Context) error {
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.provisioned {
		return nil
	}
	if id.selfSigned {
		return errdefs.FailedPrecondition("the TLS key still has its self-signed certificate: install the fleet CA's (cmlctl device csr; cmlctl device cert FILE)")
	}
	if id.ak == nil {
		return errdefs.FailedPrecondition("the attestation key has no certificate: install one (cmlctl device csr --attestation; cmlctl device cert FILE)")
	}
	if err := atomicfile.Write(filepath.Join(id.o.Dir, provisionedFile), []byte(id.o.Now().UTC().Format(time.RFC3339)+"\n"), 0o600); err != nil {
		return err
	}
	id.provisioned = true
	id.o.Audit.Record(ctx, audit.Event{Type: "device", Operation: "device.provisioned", Outcome: audit.Success, Object: id.uuid})
	return nil
}

// Attest answers a challenge: a quote over the measurement PCR and any
// other selected PCRs with nonce, and what a verifier needs to check it.
func (id *Identity) Attest(nonce []byte, pcrs []uint32) (*cmlv1.Attestation, error) {
	if len(nonce) < MinNonce || len(nonce) > MaxNonce {
		return nil, errdefs.InvalidArgument("nonce of %d bytes: want %d to %d", len(nonce), MinNonce, MaxNonce)
	}
	sel := []int{id.o.Measurer.PCR()}
	for _, p := range pcrs {
		if p > 23 {
			return nil, errdefs.InvalidArgument("PCR %d does not exist (0 to 23)", p)
		}
		if !slices.Contains(sel, int(p)) {
			sel = append(sel, int(p))
		}
	}
	slices.Sort(sel)
	q, log, err := id.o.Measurer.Attest(id.o.Keys, nonce, sel)
	if err != nil {
		return nil, fmt.Errorf("quote: %w", err)
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	a := &cmlv1.Attestation{Quote: q.Attest, Signature: q.Signature, EventLog: log,
		AttestationCertificate: id.ak, TlsCertificate: id.tls, DeviceUuid: ptr(id.uuid),
		MeasurementPcr: ptr(uint32(id.o.Measurer.PCR()))}
	for _, i := range sel {
		a.Pcrs = append(a.Pcrs, &cmlv1.PCRValue{Index: ptr(uint32(i)), Sha256: q.PCRs[i]})
	}
	return a, nil
}
