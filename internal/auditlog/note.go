// Package auditlog is the format of cmld's tamper-evident audit trail and
// its verification, shared by the writer (internal/audit, in cmld) and
// the off-device verifier (cmlverify audit), which links no daemon code.
//
// The trail is JSON lines. Each record carries a sequence number that
// never repeats (also across restarts) and a hash chain over the records;
// the records are the leaves of an RFC 6962 Merkle tree, whose size and
// root are signed at checkpoints in the C2SP signed-note format with the
// device's TPM-held ECDSA P-256 key.
package auditlog

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Checkpoint is a signed statement of the tree's size and root.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   [32]byte
	// Time of signing, seconds since the epoch (an extension line).
	Time int64
}

// body is the note text that is signed (tlog-checkpoint: origin, size,
// base64 root, then extension lines).
func (c Checkpoint) body() []byte {
	return fmt.Appendf(nil, "%s\n%d\n%s\ntime %d\n", c.Origin, c.Size, base64.StdEncoding.EncodeToString(c.Root[:]), c.Time)
}

// KeyName names a checkpoint key in notes: "cml-audit+" and the first
// bytes of the key's fingerprint, and the 4-byte note key hash over the
// name, a signature-type byte (0xEC: ECDSA P-256 with SHA-256, CML's own)
// and the key.
func KeyName(pub crypto.PublicKey) (string, [4]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", [4]byte{}, err
	}
	fp := sha256.Sum256(der)
	name := fmt.Sprintf("cml-audit+%x", fp[:4])
	h := sha256.New()
	h.Write([]byte(name + "\n"))
	h.Write([]byte{0xEC})
	h.Write(der)
	var id [4]byte
	copy(id[:], h.Sum(nil))
	return name, id, nil
}

// Sign makes the signed note of c with signer (ECDSA P-256 in the TPM).
func Sign(c Checkpoint, signer crypto.Signer) ([]byte, error) {
	name, id, err := KeyName(signer.Public())
	if err != nil {
		return nil, err
	}
	body := c.body()
	d := sha256.Sum256(body)
	sig, err := signer.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign checkpoint: %w", err)
	}
	blob := append(id[:], sig...)
	var b bytes.Buffer
	b.Write(body)
	b.WriteString("\n")
	fmt.Fprintf(&b, "\u2014 %s %s\n", name, base64.StdEncoding.EncodeToString(blob))
	return b.Bytes(), nil
}

// ErrSignature is a note no given key signed.
var ErrSignature = errors.New("checkpoint signature does not verify with the device's key")

// Open parses one signed note and verifies its signature with one of keys.
func Open(note []byte, keys []crypto.PublicKey) (Checkpoint, error) {
	var c Checkpoint
	i := bytes.Index(note, []byte("\n\n"))
	if i < 0 {
		return c, fmt.Errorf("not a signed note")
	}
	body, sigs := note[:i+1], note[i+2:]
	lines := strings.Split(strings.TrimSuffix(string(body), "\n"), "\n")
	if len(lines) < 3 {
		return c, fmt.Errorf("checkpoint has %d lines", len(lines))
	}
	c.Origin = lines[0]
	n, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil {
		return c, fmt.Errorf("checkpoint size %q", lines[1])
	}
	c.Size = n
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != 32 {
		return c, fmt.Errorf("checkpoint root %q", lines[2])
	}
	copy(c.Root[:], root)
	for _, l := range lines[3:] {
		if t, ok := strings.CutPrefix(l, "time "); ok {
			c.Time, _ = strconv.ParseInt(t, 10, 64)
		}
	}
	if !bytes.Equal(c.body(), body) {
		return c, fmt.Errorf("checkpoint is not in canonical form")
	}
	d := sha256.Sum256(body)
	for _, sl := range strings.Split(strings.TrimSpace(string(sigs)), "\n") {
		f := strings.Fields(strings.TrimPrefix(sl, "\u2014 "))
		if len(f) != 2 {
			continue
		}
		blob, err := base64.StdEncoding.DecodeString(f[1])
		if err != nil || len(blob) < 5 {
			continue
		}
		for _, k := range keys {
			name, id, err := KeyName(k)
			if err != nil || name != f[0] || !bytes.Equal(id[:], blob[:4]) {
				continue
			}
			if pk, ok := k.(*ecdsa.PublicKey); ok && ecdsa.VerifyASN1(pk, d[:], blob[4:]) {
				return c, nil
			}
		}
	}
	return c, ErrSignature
}
