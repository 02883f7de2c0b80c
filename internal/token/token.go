// Package token keeps each encrypted container's storage secret: a random
// 256-bit secret per container, stored only wrapped by a token the
// operator unlocks with a PIN (TSF-DATA, CR 1.5, CR 4.1). Soft tokens wrap
// it with a key from Argon2id of the PIN; PKCS#11 tokens with a
// per-container non-extractable AES key on the token; the TPM keeps it in
// an NV index under a PIN policy. Wrong PINs are counted per container
// token, persisted, and lock the token after a device-set limit until an
// administrator resets it (CR 1.11); every refusal looks the same to the
// caller (CR 1.10) and carries its detail for the audit trail only.
package token

import (
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
)

// SecretSize is the size of a container's storage secret.
const SecretSize = 32

// Backend wraps and unwraps container secrets. dir is the container's
// token directory (wrapped key files); id its UUID.
type Backend interface {
	// Name is the token type as users see it ("soft", "pkcs11", "tpm").
	Name() string
	// Wrap stores secret under pin.
	Wrap(ctx context.Context, dir, id string, pin, secret []byte) error
	// Unwrap returns the secret; a wrong PIN is ErrWrongPIN.
	Unwrap(ctx context.Context, dir, id string, pin []byte) ([]byte, error)
	// Destroy destroys what the token holds for the container (its key
	// object, its NV index) so that no copy of the wrapped secret can be
	// unwrapped again; a soft token can only delete its file.
	Destroy(ctx context.Context, dir, id string) error
	// Exists reports whether the container has a wrapped secret.
	Exists(dir, id string) bool
}

// ErrWrongPIN is a PIN the token refused.
var ErrWrongPIN = errors.New("wrong PIN")

// UnlockError is what a caller sees for any refused unlock: a wrong PIN,
// a locked token and a container without a token read the same (CR 1.10).
// Detail, for the audit trail, says which it was.
type UnlockError struct {
	Detail string
}

func (e *UnlockError) Error() string { return "the container's token could not be unlocked" }

// NewSecret makes a container's secret.
func NewSecret() ([]byte, error) {
	s := make([]byte, SecretSize)
	if _, err := rand.Read(s); err != nil {
		return nil, err
	}
	return s, nil
}

// Derive derives a key of n bytes for purpose from a container's secret
// (HKDF-SHA256, the container id as salt).
func Derive(secret []byte, id, purpose string, n int) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, secret, []byte(id), "cml "+purpose+" v1", n)
	if err != nil {
		return nil, fmt.Errorf("derive %s key: %w", purpose, err)
	}
	return k, nil
}

// Zero overwrites key material.
func Zero(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
