package token

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/crypto/argon2"

	"github.com/cmlproject/cml/internal/atomicfile"
)

// Argon2id parameters: RFC 9106's second recommended option (t=3, 64 MiB;
// the first needs 2 GiB, too much for a device), 4 lanes.
const (
	argonTime    = 3
	argonMemKiB  = 64 * 1024
	argonThreads = 4
)

// Soft is the soft token: the secret wrapped with AES-256-GCM under a key
// from Argon2id of the PIN, bound to the container's id and the
// parameters. Anyone with a copy of the file and the PIN has the secret,
// also after a wipe.
type Soft struct{}

type softFile struct {
	Version int    `json:"version"`
	KDF     string `json:"kdf"`
	Time    uint32 `json:"t"`
	MemKiB  uint32 `json:"m_kib"`
	Threads uint8  `json:"p"`
	Salt    []byte `json:"salt"`
	Nonce   []byte `json:"nonce"`
	Wrapped []byte `json:"wrapped"`
}

const softName = "soft.key"

// Name implements Backend.
func (Soft) Name() string { return "soft" }

func (f *softFile) aad(id string) []byte {
	return fmt.Appendf(nil, "cml soft token v%d %s %s t=%d m=%d p=%d", f.Version, id, f.KDF, f.Time, f.MemKiB, f.Threads)
}

func (f *softFile) aead(pin []byte) (cipher.AEAD, error) {
	k := argon2.IDKey(pin, f.Salt, f.Time, f.MemKiB, f.Threads, 32)
	defer Zero(k)
	b, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// Wrap implements Backend.
func (Soft) Wrap(_ context.Context, dir, id string, pin, secret []byte) error {
	f := &softFile{Version: 1, KDF: "argon2id", Time: argonTime, MemKiB: argonMemKiB, Threads: argonThreads, Salt: make([]byte, 16), Nonce: make([]byte, 12)}
	rand.Read(f.Salt)
	rand.Read(f.Nonce)
	g, err := f.aead(pin)
	if err != nil {
		return err
	}
	f.Wrapped = g.Seal(nil, f.Nonce, secret, f.aad(id))
	b, _ := json.Marshal(f)
	return atomicfile.Write(filepath.Join(dir, softName), b, 0o600)
}

// Unwrap implements Backend.
func (Soft) Unwrap(_ context.Context, dir, id string, pin []byte) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(dir, softName))
	if err != nil {
		return nil, err
	}
	var f softFile
	if err := json.Unmarshal(b, &f); err != nil || f.Version != 1 || f.KDF != "argon2id" {
		return nil, fmt.Errorf("soft token file is unreadable")
	}
	// Parameters come from the file but are bound by the AAD; bounds keep
	// a doctored file from making cmld allocate without limit.
	if f.Time == 0 || f.Time > 16 || f.MemKiB < 8*1024 || f.MemKiB > 1024*1024 || f.Threads == 0 || len(f.Nonce) != 12 {
		return nil, fmt.Errorf("soft token file has unacceptable parameters")
	}
	g, err := f.aead(pin)
	if err != nil {
		return nil, err
	}
	s, err := g.Open(nil, f.Nonce, f.Wrapped, f.aad(id))
	if err != nil {
		return nil, ErrWrongPIN
	}
	return s, nil
}

// Destroy implements Backend: only the file goes; copies of it still open
// with the PIN.
func (Soft) Destroy(_ context.Context, dir, _ string) error {
	if err := os.Remove(filepath.Join(dir, softName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Exists implements Backend.
func (Soft) Exists(dir, _ string) bool {
	_, err := os.Stat(filepath.Join(dir, softName))
	return err == nil
}
