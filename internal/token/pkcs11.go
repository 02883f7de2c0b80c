package token

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/cmlproject/cml/internal/atomicfile"
)

// PKCS11 wraps container secrets with a per-container AES-256 key that
// lives on a PKCS#11 token (a SmartCard-HSM through OpenSC, SoftHSM2, any
// module) and never leaves it: sensitive, not extractable. The wrapped
// secret (CKM_AES_KEY_WRAP_PAD, RFC 5649) is a file; destroying the key
// object on the token makes every copy of that file useless.
type PKCS11 struct {
	Module string
	Label  string // token label; empty = the first slot with a token

	once sync.Once
	ctx  *pkcs11.Ctx
	err  error
	// op serializes operations on the token, session to logout: a
	// token's login state is shared by all sessions of a process, so
	// one operation's logout would cut off another's, and a login
	// while another is logged in would not check the PIN at all.
	op sync.Mutex
}

const pkcs11Name = "pkcs11.wrapped"

// Name implements Backend.
func (p *PKCS11) Name() string { return "pkcs11" }

func (p *PKCS11) init() error {
	p.once.Do(func() {
		if p.Module == "" {
			p.err = fmt.Errorf("no PKCS#11 module configured (device setting storage.pkcs11_module)")
			return
		}
		c := pkcs11.New(p.Module)
		if c == nil {
			p.err = fmt.Errorf("cannot load PKCS#11 module %s", p.Module)
			return
		}
		if err := c.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
			p.err = fmt.Errorf("PKCS#11 module %s: %w", p.Module, err)
			return
		}
		p.ctx = c
	})
	return p.err
}

// session opens a logged-in session on the token; done ends it. The
// token is held in between (p.op).
func (p *PKCS11) session(pin []byte) (sh pkcs11.SessionHandle, err error) {
	if err := p.init(); err != nil {
		return 0, err
	}
	p.op.Lock()
	defer func() {
		if err != nil {
			p.op.Unlock()
		}
	}()
	slots, err := p.ctx.GetSlotList(true)
	if err != nil {
		return 0, err
	}
	for _, s := range slots {
		ti, err := p.ctx.GetTokenInfo(s)
		if err != nil || (p.Label != "" && trimLabel(ti.Label) != p.Label) {
			continue
		}
		sh, err := p.ctx.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return 0, err
		}
		if err := p.ctx.Login(sh, pkcs11.CKU_USER, string(pin)); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
			p.ctx.CloseSession(sh)
			if errors.Is(err, pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)) || errors.Is(err, pkcs11.Error(pkcs11.CKR_PIN_LEN_RANGE)) {
				return 0, ErrWrongPIN
			}
			if errors.Is(err, pkcs11.Error(pkcs11.CKR_PIN_LOCKED)) {
				return 0, fmt.Errorf("the token itself locked its PIN")
			}
			return 0, err
		}
		return sh, nil
	}
	return 0, fmt.Errorf("PKCS#11 token %q not present", p.Label)
}

func (p *PKCS11) done(sh pkcs11.SessionHandle) {
	p.ctx.Logout(sh)
	p.ctx.CloseSession(sh)
	p.op.Unlock()
}

func trimLabel(s string) string {
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == 0) {
		s = s[:len(s)-1]
	}
	return s
}

func keyLabel(id string) string { return "cml-" + id }

// findKey returns the container's wrapping key on the token.
func (p *PKCS11) findKey(sh pkcs11.SessionHandle, id string) ([]pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, keyLabel(id)),
	}
	if err := p.ctx.FindObjectsInit(sh, tmpl); err != nil {
		return nil, err
	}
	objs, _, err := p.ctx.FindObjects(sh, 8)
	p.ctx.FindObjectsFinal(sh)
	return objs, err
}

var wrapMech = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}

// Wrap implements Backend: a new non-extractable AES key on the token
// wraps the secret (carried into the token as a session object).
func (p *PKCS11) Wrap(_ context.Context, dir, id string, pin, secret []byte) error {
	sh, err := p.session(pin)
	if err != nil {
		return err
	}
	defer p.done(sh)
	old, err := p.findKey(sh, id)
	if err != nil {
		return err
	}
	wk, err := p.ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, keyLabel(id)),
	})
	if err != nil {
		return fmt.Errorf("generate the container's key on the token: %w", err)
	}
	sk, err := p.ctx.CreateObject(sh, secretTemplate(secret))
	if err != nil {
		p.ctx.DestroyObject(sh, wk)
		return fmt.Errorf("carry the secret into the token: %w", err)
	}
	wrapped, err := p.ctx.WrapKey(sh, wrapMech, wk, sk)
	p.ctx.DestroyObject(sh, sk)
	if err != nil {
		p.ctx.DestroyObject(sh, wk)
		return fmt.Errorf("wrap on the token: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, pkcs11Name), wrapped, 0o600); err != nil {
		p.ctx.DestroyObject(sh, wk)
		return err
	}
	// A PIN change re-wraps under a new key: the old one goes only now.
	for _, o := range old {
		p.ctx.DestroyObject(sh, o)
	}
	return nil
}

func secretTemplate(value []byte) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
	}
	if value != nil {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_VALUE, value))
	}
	return t
}

// Unwrap implements Backend.
func (p *PKCS11) Unwrap(_ context.Context, dir, id string, pin []byte) ([]byte, error) {
	wrapped, err := os.ReadFile(filepath.Join(dir, pkcs11Name))
	if err != nil {
		return nil, err
	}
	sh, err := p.session(pin)
	if err != nil {
		return nil, err
	}
	defer p.done(sh)
	keys, err := p.findKey(sh, id)
	if err != nil {
		return nil, err
	}
	if len(keys) != 1 {
		return nil, fmt.Errorf("the container's key is not on the token (wiped, or another token)")
	}
	sk, err := p.ctx.UnwrapKey(sh, wrapMech, keys[0], wrapped, secretTemplate(nil))
	if err != nil {
		return nil, fmt.Errorf("unwrap on the token: %w", err)
	}
	defer p.ctx.DestroyObject(sh, sk)
	attrs, err := p.ctx.GetAttributeValue(sh, sk, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err != nil || len(attrs) != 1 || len(attrs[0].Value) != SecretSize {
		return nil, fmt.Errorf("read the unwrapped secret: %v", err)
	}
	return attrs[0].Value, nil
}

// Destroy implements Backend: the key object on the token is destroyed;
// every copy of the wrapped file is useless from then on. It needs a
// logged-in session, so the operator's PIN: DestroyWithPIN. Without a PIN
// only the file goes (and the key object stays, unusable without it).
func (p *PKCS11) Destroy(_ context.Context, dir, _ string) error {
	if err := os.Remove(filepath.Join(dir, pkcs11Name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// DestroyWithPIN destroys the container's key object on the token and
// the wrapped file.
func (p *PKCS11) DestroyWithPIN(ctx context.Context, dir, id string, pin []byte) error {
	sh, err := p.session(pin)
	if err != nil {
		return err
	}
	defer p.done(sh)
	keys, err := p.findKey(sh, id)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if err := p.ctx.DestroyObject(sh, k); err != nil {
			return fmt.Errorf("destroy the container's key on the token: %w", err)
		}
	}
	return p.Destroy(ctx, dir, id)
}

// Exists implements Backend.
func (p *PKCS11) Exists(dir, _ string) bool {
	_, err := os.Stat(filepath.Join(dir, pkcs11Name))
	return err == nil
}

// ChangePIN changes the token's user PIN (C_SetPIN): a PKCS#11 token has
// one PIN for every container whose key it holds.
func (p *PKCS11) ChangePIN(_ context.Context, oldPIN, newPIN []byte) error {
	sh, err := p.session(oldPIN)
	if err != nil {
		return err
	}
	defer p.done(sh)
	if err := p.ctx.SetPIN(sh, string(oldPIN), string(newPIN)); err != nil {
		return fmt.Errorf("set the token's PIN: %w", err)
	}
	return nil
}
