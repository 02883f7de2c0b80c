package token

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cmlproject/cml/internal/atomicfile"
)

// attempts is a container token's count of wrong PINs in a row. It is
// written before the PIN is tried (a crash mid-check counts as a wrong
// PIN, so killing cmld does not give an attacker free guesses) and reset
// after a success.
type attempts struct {
	Failures int  `json:"failures"`
	Locked   bool `json:"locked"`
}

const attemptsName = "attempts.json"

func readAttempts(dir string) (attempts, error) {
	var a attempts
	b, err := os.ReadFile(filepath.Join(dir, attemptsName))
	if errors.Is(err, os.ErrNotExist) {
		return a, nil
	}
	if err != nil {
		return a, err
	}
	if err := json.Unmarshal(b, &a); err != nil {
		// A damaged counter fails closed.
		return attempts{Locked: true}, nil
	}
	return a, nil
}

func writeAttempts(dir string, a attempts) error {
	b, _ := json.Marshal(a)
	return atomicfile.Write(filepath.Join(dir, attemptsName), b, 0o600)
}

// Keeper unlocks container secrets through a backend, counting wrong PINs.
// Calls for one container must not overlap (the container manager holds
// the container's operation lock); calls for different containers may.
type Keeper struct {
	// MaxAttempts wrong PINs in a row lock the token (default 3).
	MaxAttempts int
}

func (k *Keeper) max() int {
	if k.MaxAttempts <= 0 {
		return 3
	}
	return k.MaxAttempts
}

// Create makes a new secret for a container and wraps it under pin.
func (k *Keeper) Create(ctx context.Context, b Backend, dir, id string, pin []byte) ([]byte, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if len(pin) == 0 {
		return nil, &UnlockError{Detail: "no PIN given for a new token"}
	}
	s, err := NewSecret()
	if err != nil {
		return nil, err
	}
	if err := b.Wrap(ctx, dir, id, pin, s); err != nil {
		Zero(s)
		if errors.Is(err, ErrWrongPIN) {
			return nil, &UnlockError{Detail: "the token refused the PIN"}
		}
		return nil, err
	}
	if err := writeAttempts(dir, attempts{}); err != nil {
		Zero(s)
		return nil, err
	}
	return s, nil
}

// Unlock returns a container's secret. Any refusal is an *UnlockError
// whose message is the same for a wrong PIN, a locked token and a
// container without a token; its Detail says which, with the count.
func (k *Keeper) Unlock(ctx context.Context, b Backend, dir, id string, pin []byte) ([]byte, error) {
	if !b.Exists(dir, id) {
		return nil, &UnlockError{Detail: "the container has no wrapped key for its " + b.Name() + " token"}
	}
	a, err := readAttempts(dir)
	if err != nil {
		return nil, err
	}
	if a.Locked {
		return nil, &UnlockError{Detail: fmt.Sprintf("token locked after %d wrong PINs; an administrator must reset it", a.Failures)}
	}
	if len(pin) == 0 {
		return nil, &UnlockError{Detail: "no PIN given"}
	}
	a.Failures++
	if err := writeAttempts(dir, a); err != nil {
		return nil, fmt.Errorf("count the PIN attempt: %w", err)
	}
	s, err := b.Unwrap(ctx, dir, id, pin)
	if err != nil {
		if !errors.Is(err, ErrWrongPIN) {
			// Not the PIN's fault (a missing token, a broken file): the
			// attempt does not count.
			a.Failures--
			writeAttempts(dir, a)
			return nil, &UnlockError{Detail: err.Error()}
		}
		detail := fmt.Sprintf("wrong PIN (%d of %d attempts)", a.Failures, k.max())
		if a.Failures >= k.max() {
			a.Locked = true
			if err := writeAttempts(dir, a); err != nil {
				return nil, fmt.Errorf("lock the token: %w", err)
			}
			detail = fmt.Sprintf("wrong PIN (%d of %d attempts): token locked until an administrator resets it", a.Failures, k.max())
		}
		return nil, &UnlockError{Detail: detail}
	}
	if err := writeAttempts(dir, attempts{}); err != nil {
		Zero(s)
		return nil, err
	}
	return s, nil
}

// Locked reports whether a container's token is locked.
func (k *Keeper) Locked(dir string) bool {
	a, _ := readAttempts(dir)
	return a.Locked
}

// Reset unlocks a locked token and clears its count (an administrator's
// act).
func (k *Keeper) Reset(dir string) error {
	if _, err := os.Stat(dir); err != nil {
		return err
	}
	return writeAttempts(dir, attempts{})
}

// ChangePIN re-wraps a container's secret under a new PIN; the old PIN
// counts as an unlock attempt.
func (k *Keeper) ChangePIN(ctx context.Context, b Backend, dir, id string, oldPIN, newPIN []byte) error {
	if len(newPIN) == 0 {
		return fmt.Errorf("the new PIN is empty")
	}
	s, err := k.Unlock(ctx, b, dir, id, oldPIN)
	if err != nil {
		return err
	}
	defer Zero(s)
	if pc, ok := b.(interface {
		ChangePIN(ctx context.Context, oldPIN, newPIN []byte) error
	}); ok {
		return pc.ChangePIN(ctx, oldPIN, newPIN)
	}
	return b.Wrap(ctx, dir, id, newPIN, s)
}
