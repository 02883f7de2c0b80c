// Package backup reads and writes CML configuration backups (CR 7.3,
// CR 7.4, OS-06): a tar of files with a MANIFEST of their SHA-256 sums (the
// format `sha256sum -c` reads), MANIFEST.sig (the device key's signature
// of MANIFEST, as `openssl dgst -sha256 -verify` checks it) and device.pem
// (the device's certificate chain), the whole encrypted with age
// (https://age-encryption.org) to the owner's recipients. Each layer is a
// standard format so that an owner can check and open a backup without
// CML: `age -d -i owner.key | tar -x`, `openssl dgst`, `sha256sum -c`.
//
// It does not decide what goes into a backup or what a restore applies
// (the API does), nor whether a device's certificate is to be trusted (the
// caller verifies Backup.Chain). It holds a backup in memory: backups are
// configuration, bounded by MaxSize.
package backup

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"

	"filippo.io/age"

	"github.com/cmlproject/cml/internal/sign"
)

// Names of the backup's own files.
const (
	ManifestFile  = "MANIFEST"
	SignatureFile = "MANIFEST.sig"
	ChainFile     = "device.pem"
	InfoFile      = "info.json"
)

// MaxSize bounds a backup's plaintext and each file in it.
const MaxSize = 64 << 20

// Format is the value of Info.Format this package writes and reads.
const Format = "cml-backup-1"

// Info describes a backup; it is one of its files, covered by MANIFEST.
type Info struct {
	Format  string    `json:"format"`
	Device  string    `json:"device"`
	Created time.Time `json:"created"`
	// By is the account that made it.
	By string `json:"by,omitempty"`
}

// Backup is an opened backup whose MANIFEST, signature and file sums
// hold together. Whether Chain is a device to trust is the caller's check.
type Backup struct {
	Info  Info
	Files map[string][]byte
	// Chain is the signing device's certificate chain, leaf first.
	Chain []*x509.Certificate
	// Plain is the unencrypted tar (what a restore sends to a device).
	Plain []byte
}

// Names returns the backup's files (not its own), sorted.
func (b *Backup) Names() []string {
	var out []string
	for n := range b.Files {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Seal writes files as a backup signed by signer (the device key, whose
// certificate chain chainPEM is, leaf first) and encrypted to recipients.
func Seal(w io.Writer, info Info, files map[string][]byte, signer crypto.Signer, chainPEM []byte, recipients []age.Recipient) error {
	plain, err := Build(info, files, signer, chainPEM)
	if err != nil {
		return err
	}
	return Encrypt(w, plain, recipients)
}

// Build returns the signed, unencrypted tar of a backup.
func Build(info Info, files map[string][]byte, signer crypto.Signer, chainPEM []byte) ([]byte, error) {
	info.Format = Format
	ib, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return nil, err
	}
	all := map[string][]byte{InfoFile: append(ib, '\n')}
	for n, b := range files {
		if err := checkName(n); err != nil {
			return nil, err
		}
		all[n] = b
	}
	names := make([]string, 0, len(all))
	for n := range all {
		names = append(names, n)
	}
	sort.Strings(names)
	var manifest bytes.Buffer
	for _, n := range names {
		sum := sha256.Sum256(all[n])
		fmt.Fprintf(&manifest, "%s  %s\n", hex.EncodeToString(sum[:]), n)
	}
	sig, err := signManifest(signer, manifest.Bytes())
	if err != nil {
		return nil, fmt.Errorf("sign the backup: %w", err)
	}
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	add := func(n string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o600, Size: int64(len(b)), ModTime: info.Created, Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	// The manifest, its signature and the chain first: a reader can check
	// them before it reads any file.
	for _, f := range []struct {
		n string
		b []byte
	}{{ManifestFile, manifest.Bytes()}, {SignatureFile, sig}, {ChainFile, chainPEM}} {
		if err := add(f.n, f.b); err != nil {
			return nil, err
		}
	}
	for _, n := range names {
		if err := add(n, all[n]); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if out.Len() > MaxSize {
		return nil, fmt.Errorf("backup of %d bytes is larger than %d", out.Len(), MaxSize)
	}
	return out.Bytes(), nil
}

// signManifest signs SHA-256(m): ECDSA as ASN.1 DER, RSA as PKCS #1 v1.5
// (what `openssl dgst -sha256 -sign` makes and `-verify` checks).
func signManifest(signer crypto.Signer, m []byte) ([]byte, error) {
	sum := sha256.Sum256(m)
	switch signer.Public().(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey:
	default:
		return nil, fmt.Errorf("key type %T is not supported", signer.Public())
	}
	return signer.Sign(rand.Reader, sum[:], crypto.SHA256)
}

// Encrypt encrypts a backup's tar to recipients.
func Encrypt(w io.Writer, plain []byte, recipients []age.Recipient) error {
	if len(recipients) == 0 {
		return errors.New("no recipient to encrypt the backup to")
	}
	ew, err := age.Encrypt(w, recipients...)
	if err != nil {
		return err
	}
	if _, err := ew.Write(plain); err != nil {
		return err
	}
	return ew.Close()
}

// Decrypt opens an encrypted backup with identities and checks it (see
// Parse).
func Decrypt(r io.Reader, identities []age.Identity) (*Backup, error) {
	dr, err := age.Decrypt(r, identities...)
	if err != nil {
		return nil, fmt.Errorf("decrypt the backup: %w", err)
	}
	plain, err := io.ReadAll(io.LimitReader(dr, MaxSize+1))
	if err != nil {
		// age authenticates every 64 KiB chunk: a changed byte ends here.
		return nil, fmt.Errorf("decrypt the backup: %w", err)
	}
	return Parse(plain)
}

// Parse reads a backup's tar and checks that it holds together: every file
// listed in MANIFEST once with its sum, no file that is not, and
// MANIFEST.sig a valid signature of MANIFEST by the leaf of device.pem.
func Parse(plain []byte) (*Backup, error) {
	if len(plain) > MaxSize {
		return nil, fmt.Errorf("backup larger than %d bytes", MaxSize)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(plain))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("backup: %w", err)
		}
		if h.Typeflag != tar.TypeReg {
			return nil, fmt.Errorf("backup: %s is not a regular file", h.Name)
		}
		if err := safeName(h.Name); err != nil {
			return nil, fmt.Errorf("backup: %w", err)
		}
		if _, dup := files[h.Name]; dup {
			return nil, fmt.Errorf("backup: %s twice", h.Name)
		}
		b, err := io.ReadAll(io.LimitReader(tr, MaxSize))
		if err != nil {
			return nil, fmt.Errorf("backup: %s: %w", h.Name, err)
		}
		files[h.Name] = b
	}
	manifest, sig, chainPEM := files[ManifestFile], files[SignatureFile], files[ChainFile]
	if manifest == nil || sig == nil || chainPEM == nil {
		return nil, fmt.Errorf("backup: no %s, %s and %s: not a CML backup", ManifestFile, SignatureFile, ChainFile)
	}
	chain, err := sign.ParseCertificates(chainPEM)
	if err == nil && len(chain) == 0 {
		err = errors.New("no certificate")
	}
	if err != nil {
		return nil, fmt.Errorf("backup: %s: %w", ChainFile, err)
	}
	if err := chain[0].CheckSignature(sigAlgorithm(chain[0]), manifest, sig); err != nil {
		return nil, fmt.Errorf("backup: the signature of %s does not verify with %q: %w", ManifestFile, chain[0].Subject.String(), err)
	}
	delete(files, ManifestFile)
	delete(files, SignatureFile)
	delete(files, ChainFile)
	listed := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(manifest))
	for sc.Scan() {
		sum, name, ok := strings.Cut(sc.Text(), "  ")
		if !ok || len(sum) != 2*sha256.Size || listed[name] {
			return nil, fmt.Errorf("backup: %s: malformed line %q", ManifestFile, sc.Text())
		}
		listed[name] = true
		b, ok := files[name]
		if !ok {
			return nil, fmt.Errorf("backup: %s is listed but missing", name)
		}
		got := sha256.Sum256(b)
		if hex.EncodeToString(got[:]) != sum {
			return nil, fmt.Errorf("backup: %s does not match its signed sum", name)
		}
	}
	for n := range files {
		if !listed[n] {
			return nil, fmt.Errorf("backup: %s is not in the signed %s", n, ManifestFile)
		}
	}
	out := &Backup{Files: files, Chain: chain, Plain: plain}
	if err := json.Unmarshal(files[InfoFile], &out.Info); err != nil {
		return nil, fmt.Errorf("backup: %s: %w", InfoFile, err)
	}
	if out.Info.Format != Format {
		return nil, fmt.Errorf("backup: format %q, this version reads %q", out.Info.Format, Format)
	}
	delete(out.Files, InfoFile)
	return out, nil
}

func sigAlgorithm(c *x509.Certificate) x509.SignatureAlgorithm {
	if _, ok := c.PublicKey.(*rsa.PublicKey); ok {
		return x509.SHA256WithRSA
	}
	return x509.ECDSAWithSHA256
}

// safeName refuses names that could leave the directory a backup is
// unpacked into, or break a MANIFEST line.
func safeName(n string) error {
	if n == "" || path.Clean(n) != n || path.IsAbs(n) || n == ".." || strings.HasPrefix(n, "../") || strings.ContainsAny(n, "\\\x00\n") {
		return fmt.Errorf("file name %q is not allowed", n)
	}
	return nil
}

// checkName is safeName for a file put into a backup, which may not take
// the name of one of the backup's own files.
func checkName(n string) error {
	if err := safeName(n); err != nil {
		return err
	}
	switch n {
	case ManifestFile, SignatureFile, ChainFile:
		return fmt.Errorf("file name %q is reserved", n)
	}
	return nil
}

// ParseRecipients reads age recipients ("age1..." public keys), one per
// line or separated by spaces; '#' starts a comment.
func ParseRecipients(s string) ([]age.Recipient, error) {
	var out []age.Recipient
	for _, line := range strings.Split(s, "\n") {
		line, _, _ = strings.Cut(line, "#")
		for _, f := range strings.Fields(line) {
			r, err := age.ParseX25519Recipient(f)
			if err != nil {
				return nil, fmt.Errorf("backup recipient %q: %w", f, err)
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// ParseIdentities reads an age identity file (AGE-SECRET-KEY-1... lines).
func ParseIdentities(r io.Reader) ([]age.Identity, error) {
	ids, err := age.ParseIdentities(r)
	if err != nil {
		return nil, fmt.Errorf("age identity: %w", err)
	}
	return ids, nil
}

// SignedUnder checks that the backup's signer is one of anchors or was
// issued under one of them (the backup's chain serving as intermediates).
func (b *Backup) SignedUnder(anchors []*x509.Certificate) error {
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range anchors {
		if b.Chain[0].Equal(c) {
			return nil
		}
		roots.AddCert(c)
	}
	for _, c := range b.Chain[1:] {
		inter.AddCert(c)
	}
	_, err := b.Chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}
