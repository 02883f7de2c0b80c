// Package trust is the device's trust store: which CAs may sign guest OSes
// and container configs, and which signers they revoked.
//
// Two kinds of root CA anchor it. Vendor CAs are put into <dir>/vendor at
// provisioning time (files written by the installer as root); the API cannot
// change them. Owner CAs (NDR 3.13) are added and removed through the API and
// kept in <dir>/owner. A signature chaining to a vendor CA is SIGNED, to an
// owner CA LOCALLY_SIGNED. CRLs go to <dir>/crl, one per issuer: only a
// CRL signed by a trusted CA (a root, or an intermediate whose chain to a
// root comes with it) is accepted, and a newer CRL number replaces the
// stored one; an older or equal number cannot replace it, so loading an
// old CRL cannot un-revoke anybody.
package trust

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
)

// Level is how trusted a signed object is.
type Level = cmlv1.TrustLevel

// MaxOwnerCAs bounds the owner CAs; MaxCRLs the stored CRLs.
const (
	MaxOwnerCAs = 32
	MaxCRLs     = 256
)

// Store is a device trust store.
type Store struct {
	dir    string
	mu     sync.RWMutex
	vendor map[string]*x509.Certificate // by fingerprint
	owner  map[string]*x509.Certificate
	crls   map[string]*storedCRL // by the issuer's raw subject
	roots  *x509.CertPool        // vendor and owner CAs, rebuilt when they change
	// Now returns the current time (tests move it).
	Now func() time.Time
}

// CA describes one trusted root.
type CA struct {
	Fingerprint string
	Subject     string
	NotAfter    time.Time
	Vendor      bool
}

// Result describes a verified signature.
type Result struct {
	Level       Level
	Signer      string // subject of the signing certificate
	Fingerprint string // of the signing certificate
	Root        string // subject of the trusted root it chains to
}

// Open loads the trust store at dir, creating owner/ and crl/ as needed.
// Every file in vendor/ must be a PEM CA certificate: a store that cannot
// be read in full is an error, not a smaller set of anchors.
func Open(dir string) (*Store, error) {
	s := &Store{dir: dir, vendor: map[string]*x509.Certificate{}, owner: map[string]*x509.Certificate{}, crls: map[string]*storedCRL{}, Now: time.Now}
	for _, sub := range []string{"", "vendor", "owner", "crl"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("trust store: %w", err)
		}
	}
	for sub, into := range map[string]map[string]*x509.Certificate{"vendor": s.vendor, "owner": s.owner} {
		paths, _ := filepath.Glob(filepath.Join(dir, sub, "*.pem"))
		for _, p := range paths {
			b, err := os.ReadFile(p)
			if err != nil {
				return nil, fmt.Errorf("trust store: %w", err)
			}
			c, err := parseCA(b)
			if err != nil {
				return nil, fmt.Errorf("trust store: %s: %w", p, err)
			}
			into[sign.Fingerprint(c)] = c
		}
	}
	s.rebuildRoots()
	paths, _ := filepath.Glob(filepath.Join(dir, "crl", "*.pem"))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("trust store: %w", err)
		}
		crl, err := sign.ParseRevocationList(b)
		if err != nil {
			return nil, fmt.Errorf("trust store: %s: %w", p, err)
		}
		chain := storedChain(b)
		// A CRL whose issuer is (no longer) trusted has no effect; one
		// stored by an earlier version beside a newer one of the same
		// issuer neither. Only the newest trusted one per issuer counts.
		if _, err := s.crlIssuer(crl, chain); err != nil {
			continue
		}
		if old := s.crls[string(crl.RawIssuer)]; old != nil && !newer(crl, old.crl) {
			continue
		}
		s.crls[string(crl.RawIssuer)] = &storedCRL{crl: crl, chain: chain, file: p}
	}
	return s, nil
}

// rebuildRoots refreshes the pool chains are verified against; s.mu must
// be held for writing (or s not yet shared).
func (s *Store) rebuildRoots() {
	s.roots = x509.NewCertPool()
	for _, m := range []map[string]*x509.Certificate{s.vendor, s.owner} {
		for _, c := range m {
			s.roots.AddCert(c)
		}
	}
}

func parseCA(b []byte) (*x509.Certificate, error) {
	certs, err := sign.ParseCertificates(b)
	if err != nil {
		return nil, err
	}
	if len(certs) != 1 {
		return nil, errdefs.InvalidArgument("expected one CA certificate, found %d", len(certs))
	}
	c := certs[0]
	if !c.IsCA || !c.BasicConstraintsValid {
		return nil, errdefs.InvalidArgument("certificate %q is not a CA", c.Subject.String())
	}
	if err := sign.CheckPublicKey(c.PublicKey); err != nil {
		return nil, err
	}
	return c, nil
}

// List returns the trusted roots, vendor first.
func (s *Store) List() []CA {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []CA
	for i, m := range []map[string]*x509.Certificate{s.vendor, s.owner} {
		var part []CA
		for fp, c := range m {
			part = append(part, CA{Fingerprint: fp, Subject: c.Subject.String(), NotAfter: c.NotAfter, Vendor: i == 0})
		}
		sort.Slice(part, func(i, j int) bool { return part[i].Subject < part[j].Subject })
		out = append(out, part...)
	}
	return out
}

// AddOwnerCA adds an owner root CA from PEM.
func (s *Store) AddOwnerCA(pemBytes []byte) (CA, error) {
	c, err := parseCA(pemBytes)
	if err != nil {
		return CA{}, err
	}
	if now := s.Now(); now.After(c.NotAfter) {
		return CA{}, errdefs.InvalidArgument("CA %q expired on %s", c.Subject.String(), c.NotAfter.UTC().Format(time.DateOnly))
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		return CA{}, errdefs.InvalidArgument("CA %q is not a self-signed root", c.Subject.String())
	}
	fp := sign.Fingerprint(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.vendor[fp]; ok {
		return CA{}, errdefs.AlreadyExists("CA %s is a vendor CA", fp[:16])
	}
	if _, ok := s.owner[fp]; ok {
		return CA{}, errdefs.AlreadyExists("CA %s is already registered", fp[:16])
	}
	if len(s.owner) >= MaxOwnerCAs {
		return CA{}, errdefs.FailedPrecondition("already %d owner CAs", MaxOwnerCAs)
	}
	if err := atomicfile.Write(filepath.Join(s.dir, "owner", fp+".pem"), sign.EncodeCertificates(c), 0o600); err != nil {
		return CA{}, err
	}
	s.owner[fp] = c
	s.rebuildRoots()
	return CA{Fingerprint: fp, Subject: c.Subject.String(), NotAfter: c.NotAfter}, nil
}

// RemoveOwnerCA removes the owner CA whose fingerprint starts with prefix
// (at least 8 hex digits, and unambiguous). Vendor CAs cannot be removed.
func (s *Store) RemoveOwnerCA(prefix string) (CA, error) {
	prefix = strings.ToLower(prefix)
	if len(prefix) < 8 {
		return CA{}, errdefs.InvalidArgument("fingerprint prefix %q is shorter than 8 hex digits", prefix)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var match []string
	for fp := range s.owner {
		if strings.HasPrefix(fp, prefix) {
			match = append(match, fp)
		}
	}
	switch {
	case len(match) > 1:
		return CA{}, errdefs.InvalidArgument("fingerprint prefix %q is ambiguous", prefix)
	case len(match) == 0:
		for fp := range s.vendor {
			if strings.HasPrefix(fp, prefix) {
				return CA{}, errdefs.PermissionDenied("CA %s is a vendor CA, set at provisioning; it cannot be removed through the API", fp[:16])
			}
		}
		return CA{}, errdefs.NotFound("no owner CA with fingerprint %s", prefix)
	}
	c := s.owner[match[0]]
	if err := os.Remove(filepath.Join(s.dir, "owner", match[0]+".pem")); err != nil {
		return CA{}, err
	}
	delete(s.owner, match[0])
	s.rebuildRoots()
	return CA{Fingerprint: match[0], Subject: c.Subject.String(), NotAfter: c.NotAfter}, nil
}

// storedChain returns the certificates stored after a CRL in its file.
func storedChain(b []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			return out
		}
		if blk.Type == "CERTIFICATE" {
			if c, err := x509.ParseCertificate(blk.Bytes); err == nil {
				out = append(out, c)
			}
		}
	}
}

// storedCRL is the CRL of one issuer, with the chain that made its
// issuer trusted when it was not a root.
type storedCRL struct {
	crl   *x509.RevocationList
	chain []*x509.Certificate
	file  string
}

// CRL describes one stored CRL.
type CRL struct {
	Issuer      string
	Number      string
	ThisUpdate  time.Time
	NextUpdate  time.Time
	Revoked     int
	Fingerprint string
}

func (c *storedCRL) info() CRL {
	sum := sha256.Sum256(c.crl.Raw)
	out := CRL{Issuer: c.crl.Issuer.String(), ThisUpdate: c.crl.ThisUpdate, NextUpdate: c.crl.NextUpdate, Revoked: len(c.crl.RevokedCertificateEntries), Fingerprint: hex.EncodeToString(sum[:])}
	if c.crl.Number != nil {
		out.Number = c.crl.Number.String()
	}
	return out
}

// newer reports whether a has a higher CRL number than b.
func newer(a, b *x509.RevocationList) bool {
	return a.Number != nil && (b.Number == nil || a.Number.Cmp(b.Number) > 0)
}

// crlIssuer finds the trusted CA that signed crl: a root, or a CA
// certificate in chain whose own chain leads to a root.
func (s *Store) crlIssuer(crl *x509.RevocationList, chain []*x509.Certificate) (*x509.Certificate, error) {
	for _, m := range []map[string]*x509.Certificate{s.vendor, s.owner} {
		for _, c := range m {
			if bytes.Equal(c.RawSubject, crl.RawIssuer) && crl.CheckSignatureFrom(c) == nil {
				return c, nil
			}
		}
	}
	inter := x509.NewCertPool()
	for _, c := range chain {
		inter.AddCert(c)
	}
	for _, c := range chain {
		if !bytes.Equal(c.RawSubject, crl.RawIssuer) || !c.IsCA || crl.CheckSignatureFrom(c) != nil {
			continue
		}
		if _, err := c.Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter, CurrentTime: s.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
			return c, nil
		}
	}
	return nil, errdefs.Integrity("CRL of %s: its issuer is not a trusted CA, or its signature does not verify (an intermediate CA's CRL needs its chain: --issuer)", quote(crl.Issuer.String()))
}

// quote renders a client-chosen string for a message, bounded.
func quote(s string) string {
	if len(s) > 128 {
		s = s[:128] + "..."
	}
	return fmt.Sprintf("%q", s)
}

// AddCRL stores a CRL signed by a trusted CA, replacing the stored CRL of
// the same issuer when its CRL number is higher. chainPEM carries the
// issuer's certificate chain when the issuer is an intermediate CA.
// Loading the stored CRL again is not an error.
func (s *Store) AddCRL(b, chainPEM []byte) (CRL, error) {
	crl, err := sign.ParseRevocationList(b)
	if err != nil {
		return CRL{}, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "CRL")
	}
	var chain []*x509.Certificate
	if len(chainPEM) > 0 {
		if chain, err = sign.ParseCertificates(chainPEM); err != nil {
			return CRL{}, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "CRL issuer chain")
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	issuer, err := s.crlIssuer(crl, chain)
	if err != nil {
		return CRL{}, err
	}
	key := string(crl.RawIssuer)
	old := s.crls[key]
	if old != nil {
		if bytes.Equal(old.crl.Raw, crl.Raw) {
			return old.info(), nil
		}
		if !newer(crl, old.crl) {
			return CRL{}, errdefs.FailedPrecondition("CRL of %s: number %s is not newer than the stored CRL's %s", quote(crl.Issuer.String()), numberOf(crl), numberOf(old.crl))
		}
	} else if len(s.crls) >= MaxCRLs {
		return CRL{}, errdefs.FailedPrecondition("already %d CRLs (one per issuer); remove one first", MaxCRLs)
	}
	// Keep the issuer's chain with an intermediate's CRL, so it can be
	// checked again when the store is opened.
	keep := []*x509.Certificate(nil)
	if !s.isRoot(issuer) {
		keep = chain
	}
	body := pemCRL(crl)
	for _, c := range keep {
		body = append(body, sign.EncodeCertificates(c)...)
	}
	sum := sha256.Sum256(crl.Raw)
	file := filepath.Join(s.dir, "crl", hex.EncodeToString(sum[:])+".pem")
	if err := atomicfile.Write(file, body, 0o600); err != nil {
		return CRL{}, err
	}
	if old != nil && old.file != file {
		os.Remove(old.file)
	}
	c := &storedCRL{crl: crl, chain: keep, file: file}
	s.crls[key] = c
	return c.info(), nil
}

func numberOf(c *x509.RevocationList) string {
	if c.Number == nil {
		return "(none)"
	}
	return c.Number.String()
}

func (s *Store) isRoot(c *x509.Certificate) bool {
	fp := sign.Fingerprint(c)
	return s.vendor[fp] != nil || s.owner[fp] != nil
}

// CRLs lists the stored CRLs by issuer.
func (s *Store) CRLs() []CRL {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []CRL
	for _, c := range s.crls {
		out = append(out, c.info())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Issuer < out[j].Issuer })
	return out
}

// RemoveCRL deletes the CRL named by a fingerprint prefix (at least 8 hex
// digits) or by its issuer's exact subject.
func (s *Store) RemoveCRL(ref string) (CRL, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var match []string
	for k, c := range s.crls {
		info := c.info()
		if (len(ref) >= 8 && strings.HasPrefix(info.Fingerprint, strings.ToLower(ref))) || info.Issuer == ref {
			match = append(match, k)
		}
	}
	switch len(match) {
	case 0:
		return CRL{}, errdefs.NotFound("no stored CRL matches %s", quote(ref))
	case 1:
	default:
		return CRL{}, errdefs.InvalidArgument("%s matches %d CRLs; give more of the fingerprint", quote(ref), len(match))
	}
	c := s.crls[match[0]]
	if err := os.Remove(c.file); err != nil && !errors.Is(err, os.ErrNotExist) {
		return CRL{}, err
	}
	delete(s.crls, match[0])
	return c.info(), nil
}

// Verify checks sig over msg with the signer chain in chainPEM (leaf first)
// and returns how trusted it is. at is the time the chain must be valid:
// now for a new install, the time of acceptance when re-checking something
// installed earlier (so an expiring signer does not brick a device, while a
// revocation or a removed CA still does).
func (s *Store) Verify(msg, sig, chainPEM []byte, at time.Time) (Result, error) {
	if len(sig) == 0 {
		return Result{}, errdefs.Integrity("not signed")
	}
	if len(sig) > sign.MaxSignatureSize {
		return Result{}, errdefs.InvalidArgument("signature of %d bytes is larger than %d", len(sig), sign.MaxSignatureSize)
	}
	certs, err := sign.ParseCertificates(chainPEM)
	if err != nil {
		return Result{}, err
	}
	leaf := certs[0]
	name := leaf.Subject.String()
	if err := checkLoop(certs); err != nil {
		return Result{}, err
	}
	if at.Before(leaf.NotBefore) {
		return Result{}, errdefs.Integrity("signer %q is not valid before %s", name, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if at.After(leaf.NotAfter) {
		return Result{}, errdefs.Integrity("signer %q expired on %s", name, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return Result{}, errdefs.Integrity("signer %q may not sign (no digitalSignature key usage)", name)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageCodeSigning) {
		// Explicitly: Go's chain check treats a leaf without any EKU as
		// good for every purpose.
		return Result{}, errdefs.Integrity("signer %q is not a code-signing certificate (extended key usage codeSigning)", name)
	}
	if err := sign.Verify(leaf.PublicKey, msg, sig); err != nil {
		return Result{}, errdefs.Integrity("signature by %q does not match the signed file", name)
	}

	s.mu.RLock()
	defer s.mu.RUnlock()
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}})
	if err != nil {
		var inv x509.CertificateInvalidError
		var ua x509.UnknownAuthorityError
		switch {
		case errors.As(err, &inv) && inv.Reason == x509.IncompatibleUsage:
			return Result{}, errdefs.Integrity("signer %q is not a code-signing certificate (extended key usage codeSigning)", name)
		case errors.As(err, &inv) && inv.Reason == x509.Expired:
			return Result{}, errdefs.Integrity("signer %q: a certificate in its chain is expired or not yet valid", name)
		case errors.As(err, &ua):
			return Result{}, errdefs.Integrity("signer %q does not chain to a trusted CA", name)
		}
		return Result{}, errdefs.Integrity("signer %q: %v", name, err)
	}
	best := Result{}
	var lastErr error
	for _, ch := range chains {
		if err := s.checkRevoked(ch, at); err != nil {
			lastErr = err
			continue
		}
		root := ch[len(ch)-1]
		lvl := cmlv1.TrustLevel_LOCALLY_SIGNED
		if _, ok := s.vendor[sign.Fingerprint(root)]; ok {
			lvl = cmlv1.TrustLevel_SIGNED
		}
		if lvl > best.Level {
			best = Result{Level: lvl, Signer: name, Fingerprint: sign.Fingerprint(leaf), Root: root.Subject.String()}
		}
	}
	if best.Level == 0 {
		return Result{}, lastErr
	}
	return best, nil
}

// checkRevoked refuses a chain any of whose certificates a CRL from its
// issuer lists.
func (s *Store) checkRevoked(chain []*x509.Certificate, at time.Time) error {
	for i := 0; i+1 < len(chain); i++ {
		c, issuer := chain[i], chain[i+1]
		if stored := s.crls[string(issuer.RawSubject)]; stored != nil {
			crl := stored.crl
			if crl.CheckSignatureFrom(issuer) != nil {
				continue
			}
			for _, e := range crl.RevokedCertificateEntries {
				if e.SerialNumber.Cmp(c.SerialNumber) == 0 && !e.RevocationTime.After(s.Now()) {
					return errdefs.Integrity("certificate %q was revoked by %q on %s", c.Subject.String(), issuer.Subject.String(), e.RevocationTime.UTC().Format(time.RFC3339))
				}
			}
		}
	}
	return nil
}

// checkLoop refuses a chain whose issuer links, followed from the leaf,
// come back to a certificate already seen.
func checkLoop(certs []*x509.Certificate) error {
	seen := map[*x509.Certificate]bool{}
	cur := certs[0]
	for cur != nil {
		seen[cur] = true
		if bytes.Equal(cur.RawIssuer, cur.RawSubject) && cur.CheckSignatureFrom(cur) == nil {
			return nil // self-signed root ends the chain
		}
		var next *x509.Certificate
		for _, c := range certs {
			if bytes.Equal(c.RawSubject, cur.RawIssuer) && cur.CheckSignatureFrom(c) == nil {
				if seen[c] {
					return errdefs.InvalidArgument("certificate chain has a loop at %q", c.Subject.String())
				}
				next = c
				break
			}
		}
		cur = next
	}
	return nil
}

func pemCRL(crl *x509.RevocationList) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: crl.Raw})
}

// FromRoots returns an in-memory store trusting roots as vendor CAs, for
// checking signatures off the device (cmlsign verify).
func FromRoots(roots []*x509.Certificate) *Store {
	s := &Store{vendor: map[string]*x509.Certificate{}, owner: map[string]*x509.Certificate{}, Now: time.Now}
	for _, c := range roots {
		s.vendor[sign.Fingerprint(c)] = c
	}
	s.rebuildRoots()
	return s
}

// VerifyClient checks a remote caller's certificate chain (leaf first):
// it must chain to an owner CA (vendor CAs sign software, not people),
// be valid now, be for client authentication, and no certificate of it
// may be revoked by a stored CRL (IAM-03).
func (s *Store) VerifyClient(chain []*x509.Certificate) error {
	if len(chain) == 0 {
		return errdefs.PermissionDenied("no client certificate")
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	roots := x509.NewCertPool()
	for _, c := range s.owner {
		roots.AddCert(c)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	chains, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: s.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return errdefs.PermissionDenied("client certificate %q: %v", chain[0].Subject.CommonName, err)
	}
	for _, ch := range chains {
		if err := s.checkRevoked(ch, s.Now()); err != nil {
			return errdefs.PermissionDenied("client certificate %q: %v", chain[0].Subject.CommonName, err)
		}
	}
	return nil
}

// Export returns, for a backup, the owner CAs (PEM by fingerprint) and the
// stored CRLs (PEM by fingerprint, with the issuer chain kept for an
// intermediate's CRL, nil for a root's), as CARegister and CRLLoad take
// them back.
func (s *Store) Export() (owner map[string][]byte, crls map[string][2][]byte) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	owner, crls = map[string][]byte{}, map[string][2][]byte{}
	for fp, c := range s.owner {
		owner[fp] = sign.EncodeCertificates(c)
	}
	for _, c := range s.crls {
		var chain []byte
		for _, ic := range c.chain {
			chain = append(chain, sign.EncodeCertificates(ic)...)
		}
		crls[c.info().Fingerprint] = [2][]byte{pemCRL(c.crl), chain}
	}
	return owner, crls
}
