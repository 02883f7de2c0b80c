// Package attest verifies a device's attestation, off the device and with
// no TPM: the nonce, the quote's signature by the attestation key, that
// key's certificate chain to the fleet CA, the PCR digest, the replay of
// the measurement log, and that every measured container start maps to a
// guest OS version and a config whose signatures verify against the
// reference trust roots. It returns a verdict per check and per container.
//
// It does not fetch attestations (cmd/cmlverify does) and does not judge
// boot PCRs beyond comparing them with an optional policy of exact values.
package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/bundle"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/measurelog"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/trust"
)

// MaxAnswer bounds an attestation a verifier will parse: a measurement
// log of up to measurelog.MaxLog and the rest.
const MaxAnswer = measurelog.MaxLog + 1<<20

// maxParsed bounds the cache of parsed event contents.
const maxParsed = 4096

// Reference is what a verifier trusts: signed guest OS versions and signed
// configs, each verified against the reference trust roots when loaded.
type Reference struct {
	images  map[imageKey]string // -> description, for verdicts
	configs map[string]string   // config SHA-256 hex -> description
}

type imageKey struct {
	name       string
	version    uint64
	verityRoot string
}

// LoadReference reads guest OS bundles (a guestos.conf with .sig and
// .cert beside it) and signed container configs (any other file with .sig
// and .cert beside it) under each dir, and keeps those whose signatures
// verify against roots. A signed file that does not verify is an error:
// reference values are the verifier's own input and must be clean.
func LoadReference(roots *trust.Store, dirs ...string) (*Reference, error) {
	r := &Reference{images: map[imageKey]string{}, configs: map[string]string{}}
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || strings.HasSuffix(p, sign.SigSuffix) || strings.HasSuffix(p, sign.CertSuffix) {
				return err
			}
			sig, err1 := os.ReadFile(p + sign.SigSuffix)
			chain, err2 := os.ReadFile(p + sign.CertSuffix)
			if err1 != nil || err2 != nil {
				return nil // not a signed file
			}
			text, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			res, err := roots.Verify(text, sig, chain, time.Now())
			if err != nil {
				return fmt.Errorf("reference %s: %w", p, err)
			}
			if filepath.Base(p) == bundle.ManifestFile {
				g, err := config.ParseGuestOS(p, text)
				if err != nil {
					return fmt.Errorf("reference %s: %w", p, err)
				}
				for _, m := range g.GetMounts() {
					if m.GetMountPoint() == "/" {
						r.images[imageKey{g.GetName(), g.GetVersion(), m.GetVerityRootHash()}] = fmt.Sprintf("guestos %s %d signed by %q", g.GetName(), g.GetVersion(), res.Signer)
					}
				}
				return nil
			}
			c, err := config.ParseContainer(p, text)
			if err != nil {
				return fmt.Errorf("reference %s: %w", p, err)
			}
			sum := sha256.Sum256(text)
			r.configs[hex.EncodeToString(sum[:])] = fmt.Sprintf("config %s (%s) signed by %q", c.GetName(), filepath.Base(p), res.Signer)
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Images and Configs count the loaded reference values.
func (r *Reference) Images() int  { return len(r.images) }
func (r *Reference) Configs() int { return len(r.configs) }

// Verifier checks attestations from a fleet.
type Verifier struct {
	// FleetRoots are the CAs device attestation-key certificates chain to.
	FleetRoots *x509.CertPool
	Reference  *Reference
	// Policy maps further PCRs (boot PCRs) to the exact SHA-256 values
	// they must have; a policy PCR missing from the quote fails.
	Policy map[int][]byte
	// Device, when set, is the UUID the answer must come from.
	Device string
	Now    func() time.Time
}

// Check is one named check and its outcome.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// Container is the verdict for one measured container.
type Container struct {
	UUID    string `json:"uuid"`
	Name    string `json:"name"`
	GuestOS string `json:"guestos"`
	Version uint64 `json:"version"`
	Starts  int    `json:"starts"`
	OK      bool   `json:"ok"`
	Detail  string `json:"detail"`
}

// Verdict is the outcome of one attestation.
type Verdict struct {
	OK         bool        `json:"ok"`
	Device     string      `json:"device"`
	Checks     []Check     `json:"checks"`
	Containers []Container `json:"containers"`
}

func (v *Verdict) add(name string, ok bool, format string, args ...any) bool {
	v.Checks = append(v.Checks, Check{Name: name, OK: ok, Detail: fmt.Sprintf(format, args...)})
	return ok
}

// Reason is the first failed check or container, for one-line reports.
func (v *Verdict) Reason() string {
	for _, c := range v.Checks {
		if !c.OK {
			return c.Name + ": " + c.Detail
		}
	}
	for _, c := range v.Containers {
		if !c.OK {
			return "container " + c.Name + ": " + c.Detail
		}
	}
	return ""
}

// Verify checks a device's answer to nonce. It never returns an error:
// every problem, malformed input included, is a failed check.
func (vf *Verifier) Verify(a *cmlv1.Attestation, nonce []byte) *Verdict {
	v := &Verdict{Device: a.GetDeviceUuid()}
	v.OK = vf.verify(v, a, nonce)
	return v
}

func (vf *Verifier) verify(v *Verdict, a *cmlv1.Attestation, nonce []byte) bool {
	now := time.Now()
	if vf.Now != nil {
		now = vf.Now()
	}
	// 1. The attestation key's certificate chains to the fleet CA, is
	// valid now, is an attestation key certificate, and names the device.
	certs, err := sign.ParseCertificates(a.GetAttestationCertificate())
	if err != nil {
		return v.add("certificate", false, "attestation key certificate: %v", err)
	}
	leaf := certs[0]
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: vf.FleetRoots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return v.add("certificate", false, "attestation key certificate %q: %v", leaf.Subject.CommonName, err)
	}
	// A TLS key certificate must not pass as an attestation key's: that
	// key is unrestricted and could sign a forged quote.
	if !slices.ContainsFunc(leaf.UnknownExtKeyUsage, func(o asn1.ObjectIdentifier) bool { return o.Equal(sign.OIDAttestationKey) }) {
		return v.add("certificate", false, "%q is not an attestation key certificate (no tcg-kp-AIKCertificate usage)", leaf.Subject.CommonName)
	}
	certDevice := ""
	for _, u := range leaf.URIs {
		if s, ok := strings.CutPrefix(u.String(), "urn:uuid:"); ok {
			certDevice = s
		}
	}
	if certDevice == "" || certDevice != a.GetDeviceUuid() {
		return v.add("certificate", false, "certificate names device %q, the answer claims %q", certDevice, a.GetDeviceUuid())
	}
	if vf.Device != "" && certDevice != vf.Device {
		return v.add("certificate", false, "answer comes from device %s, expected %s", certDevice, vf.Device)
	}
	v.add("certificate", true, "%q issued by %q, valid until %s", leaf.Subject.CommonName, leaf.Issuer.CommonName, leaf.NotAfter.UTC().Format(time.DateOnly))

	// 2. The quote's signature by that key.
	if err := checkSignature(leaf.PublicKey, a.GetQuote(), a.GetSignature()); err != nil {
		return v.add("signature", false, "quote signature: %v", err)
	}
	v.add("signature", true, "quote signed by the certified attestation key")

	// 3. What was signed: a quote, with our nonce.
	att, err := tpm2.DecodeAttestationData(a.GetQuote())
	if err != nil {
		return v.add("quote", false, "malformed TPMS_ATTEST: %v", err)
	}
	if att.Magic != 0xff544347 || att.Type != tpm2.TagAttestQuote || att.AttestedQuoteInfo == nil {
		return v.add("quote", false, "signed structure is not a TPM-generated quote")
	}
	if !bytes.Equal(att.ExtraData, nonce) {
		return v.add("nonce", false, "quote is for nonce %x, not %x (replayed or for another verifier)", []byte(att.ExtraData), nonce)
	}
	v.add("nonce", true, "fresh (%d bytes)", len(nonce))

	// 4. The PCR values given are the ones quoted.
	sel := att.AttestedQuoteInfo.PCRSelection
	if sel.Hash != tpm2.AlgSHA256 {
		return v.add("pcrs", false, "quote covers hash algorithm %v, not SHA-256", sel.Hash)
	}
	values := map[int][]byte{}
	for _, p := range a.GetPcrs() {
		if len(p.GetSha256()) != sha256.Size {
			return v.add("pcrs", false, "PCR %d value of %d bytes", p.GetIndex(), len(p.GetSha256()))
		}
		values[int(p.GetIndex())] = p.GetSha256()
	}
	pcrs := slices.Clone(sel.PCRs)
	slices.Sort(pcrs)
	if len(values) != len(pcrs) {
		return v.add("pcrs", false, "answer has %d PCR values, the quote covers %d", len(values), len(pcrs))
	}
	h := sha256.New()
	for _, i := range pcrs {
		val, ok := values[i]
		if !ok {
			return v.add("pcrs", false, "quote covers PCR %d, the answer has no value for it", i)
		}
		h.Write(val)
	}
	if !bytes.Equal(h.Sum(nil), att.AttestedQuoteInfo.PCRDigest) {
		return v.add("pcrs", false, "PCR values do not match the quoted PCR digest")
	}
	v.add("pcrs", true, "PCRs %v match the quote", pcrs)

	// 5. Boot PCR policy.
	for i, want := range vf.Policy {
		got, ok := values[i]
		if !ok {
			return v.add("policy", false, "PCR %d is required by the policy but was not quoted", i)
		}
		if !bytes.Equal(got, want) {
			return v.add("policy", false, "PCR %d is %x, the policy wants %x", i, got, want)
		}
	}
	if len(vf.Policy) > 0 {
		v.add("policy", true, "%d boot PCRs as required", len(vf.Policy))
	}

	// 6. The measurement log replays to the measurement PCR.
	mp := int(a.GetMeasurementPcr())
	pv, ok := values[mp]
	if !ok {
		return v.add("log", false, "measurement PCR %d was not quoted", mp)
	}
	// Walked, not decoded: a device that started containers for years has
	// a long log, and the verifier holds no more than its bytes.
	replay, events := make([]byte, sha256.Size), 0
	if err := measurelog.Walk(a.GetEventLog(), func(r measurelog.Record) error {
		if int(r.Index) == mp {
			replay = measurelog.Extend(replay, r.Digests[crypto.SHA256])
			events++
		}
		return nil
	}); err != nil {
		return v.add("log", false, "measurement log: %v", err)
	}
	if !bytes.Equal(replay, pv) {
		return v.add("log", false, "measurement log (%d events) does not replay to PCR %d: events inserted, removed, reordered or changed", events, mp)
	}
	v.add("log", true, "%d events replay to PCR %d", events, mp)

	// 7. Every measured start maps to a trusted guest OS and config.
	byUUID := map[string]int{}
	// Starts of one container with one config log identical content;
	// parse each distinct content once.
	parsed := map[string]measurelog.Event{}
	ok = true
	bad := 0
	measurelog.Walk(a.GetEventLog(), func(r measurelog.Record) error {
		if int(r.Index) != mp {
			return nil
		}
		// Distinct contents are few (one per container and config);
		// a log of all-distinct events must not grow the cache without
		// end.
		if len(parsed) > maxParsed {
			clear(parsed)
		}
		e, err := parseRecord(r, parsed)
		if err != nil {
			// Reported for the first few; a verdict stays small whatever
			// the device sent.
			if bad++; bad <= 8 {
				v.add("log", false, "event %d: %v", r.RecNum, err)
			}
			ok = false
			return nil
		}
		i, seen := byUUID[e.Container]
		if !seen {
			i = len(v.Containers)
			byUUID[e.Container] = i
			v.Containers = append(v.Containers, Container{UUID: e.Container, OK: true})
		}
		c := &v.Containers[i]
		c.Name, c.GuestOS, c.Version = e.Name, e.GuestOS, e.Version
		c.Starts++
		img, iok := vf.Reference.images[imageKey{e.GuestOS, e.Version, e.VerityRoot}]
		cfg, cok := vf.Reference.configs[e.ConfigSHA256]
		switch {
		case !c.OK:
			// Keep the first failure of this container.
		case !iok:
			c.OK, c.Detail = false, fmt.Sprintf("start %d ran guestos %s %d with verity root %.16s…, which no trusted signed manifest names", c.Starts, e.GuestOS, e.Version, e.VerityRoot)
		case !cok:
			c.OK, c.Detail = false, fmt.Sprintf("start %d ran config sha256 %.16s…, which is not among the trusted signed configs", c.Starts, e.ConfigSHA256)
		default:
			c.Detail = img + "; " + cfg
		}
		ok = ok && c.OK
		return nil
	})
	if bad > 8 {
		v.add("log", false, "%d events in all could not be read", bad)
	}
	return ok
}

// parseRecord checks that a record's digest is the hash of its content
// (the TLV encoding, as the device extended it) and parses the content.
func parseRecord(r measurelog.Record, parsed map[string]measurelog.Event) (measurelog.Event, error) {
	b, err := r.Content.MarshalBinary()
	if err != nil {
		return measurelog.Event{}, err
	}
	sum := sha256.Sum256(b)
	if !bytes.Equal(sum[:], r.Digests[crypto.SHA256]) {
		return measurelog.Event{}, fmt.Errorf("content does not match its digest")
	}
	if e, ok := parsed[string(b)]; ok {
		return e, nil
	}
	e, err := measurelog.ParseEvent(r.Content)
	if err != nil {
		return e, err
	}
	parsed[string(b)] = e
	return e, nil
}

// checkSignature verifies a TPMT_SIGNATURE over msg with pub.
func checkSignature(pub crypto.PublicKey, msg, sigBytes []byte) error {
	sig, err := tpm2.DecodeSignature(bytes.NewBuffer(sigBytes))
	if err != nil {
		return fmt.Errorf("malformed TPMT_SIGNATURE: %v", err)
	}
	if sig.Alg == tpm2.AlgECDSA && sig.ECC != nil && sig.ECC.HashAlg == tpm2.AlgSHA256 {
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok {
			return fmt.Errorf("ECDSA signature, %T key", pub)
		}
		d := sha256.Sum256(msg)
		if !ecdsa.Verify(k, d[:], sig.ECC.R, sig.ECC.S) {
			return fmt.Errorf("does not verify")
		}
		return nil
	}
	if sig.Alg == tpm2.AlgRSASSA && sig.RSA != nil && sig.RSA.HashAlg == tpm2.AlgSHA256 {
		k, ok := pub.(*rsa.PublicKey)
		if !ok {
			return fmt.Errorf("RSA signature, %T key", pub)
		}
		d := sha256.Sum256(msg)
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, d[:], sig.RSA.Signature)
	}
	return fmt.Errorf("unsupported signature scheme %v", sig.Alg)
}
