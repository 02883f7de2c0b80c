package token

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/cmlproject/cml/internal/atomicfile"
)

// TPM keeps a container's secret in an NV index of the TPM whose read
// authorization is the PIN (through an HMAC session: the PIN never crosses
// the bus in the clear) and, when PCRs are configured, also those PCRs'
// values at creation (a policy of PolicyPCR and PolicyAuthValue). The
// index is protected by the TPM's dictionary-attack logic. Destroy
// undefines the index: the secret is gone from the only place it was.
type TPM struct {
	RW   io.ReadWriter
	PCRs []uint32 // bind to these PCRs (SHA-256 bank)

	mu sync.Mutex // one TPM command sequence at a time
}

// tpmBase is the first NV index the TPM token uses (owner range).
const tpmBase = 0x01500000

type tpmFile struct {
	Index uint32   `json:"nv_index"`
	PCRs  []uint32 `json:"pcrs,omitempty"`
}

const tpmName = "tpm.json"

// Name implements Backend.
func (t *TPM) Name() string { return "tpm" }

func (t *TPM) tpm() transport.TPM { return transport.FromReadWriter(t.RW) }

func pcrSelection(pcrs []uint32) tpm2.TPMLPCRSelection {
	sel := make([]byte, 3)
	for _, p := range pcrs {
		sel[p/8] |= 1 << (p % 8)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: sel}}}
}

// pcrDigest is the SHA-256 of the selected PCRs' current values.
func (t *TPM) pcrDigest(pcrs []uint32) ([]byte, error) {
	h := sha256.New()
	for _, p := range pcrs {
		r, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection([]uint32{p})}.Execute(t.tpm())
		if err != nil || len(r.PCRValues.Digests) != 1 {
			return nil, fmt.Errorf("read PCR %d: %v", p, err)
		}
		h.Write(r.PCRValues.Digests[0].Buffer)
	}
	return h.Sum(nil), nil
}

func (t *TPM) policy(pcrs []uint32) ([]byte, error) {
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	d, err := t.pcrDigest(pcrs)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: d}, Pcrs: pcrSelection(pcrs)}).Update(calc); err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyAuthValue{}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

func (t *TPM) public(index uint32, pcrs []uint32) (tpm2.TPMSNVPublic, error) {
	pub := tpm2.TPMSNVPublic{NVIndex: tpm2.TPMHandle(index), NameAlg: tpm2.TPMAlgSHA256, DataSize: SecretSize,
		Attributes: tpm2.TPMANV{OwnerWrite: true, NT: tpm2.TPMNTOrdinary, WriteAll: true}}
	if len(pcrs) == 0 {
		pub.Attributes.AuthRead = true
		return pub, nil
	}
	pol, err := t.policy(pcrs)
	if err != nil {
		return pub, err
	}
	pub.Attributes.PolicyRead = true
	pub.AuthPolicy = tpm2.TPM2BDigest{Buffer: pol}
	return pub, nil
}

// Wrap implements Backend: a new NV index with the PIN as its auth value
// holds the secret; a PIN change defines a new index before the old one
// goes.
func (t *TPM) Wrap(_ context.Context, dir, id string, pin, secret []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	old, _ := readTPMFile(dir)
	h := sha256.Sum256([]byte(id))
	start := uint32(binary.BigEndian.Uint16(h[:2]))
	var pub tpm2.TPMSNVPublic
	var err error
	for i := uint32(0); i < 0x10000; i++ {
		index := tpmBase + (start+i)&0xffff
		if old != nil && old.Index == index {
			continue
		}
		if _, rerr := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}).Execute(t.tpm()); rerr == nil {
			continue // taken
		}
		if pub, err = t.public(index, t.PCRs); err != nil {
			return err
		}
		if _, err = (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, Auth: tpm2.TPM2BAuth{Buffer: pin}, PublicInfo: tpm2.New2B(pub)}).Execute(t.tpm()); err != nil {
			return fmt.Errorf("define the container's NV index: %w", err)
		}
		break
	}
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return err
	}
	nv := tpm2.NamedHandle{Handle: pub.NVIndex, Name: *name}
	if _, err := (tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: secret}}).Execute(t.tpm()); err != nil {
		t.undefine(uint32(pub.NVIndex))
		return fmt.Errorf("write the container's NV index: %w", err)
	}
	b, _ := json.Marshal(tpmFile{Index: uint32(pub.NVIndex), PCRs: t.PCRs})
	if err := atomicfile.Write(filepath.Join(dir, tpmName), b, 0o600); err != nil {
		t.undefine(uint32(pub.NVIndex))
		return err
	}
	if old != nil {
		t.undefine(old.Index)
	}
	return nil
}

func readTPMFile(dir string) (*tpmFile, error) {
	b, err := os.ReadFile(filepath.Join(dir, tpmName))
	if err != nil {
		return nil, err
	}
	var f tpmFile
	if err := json.Unmarshal(b, &f); err != nil || f.Index < tpmBase || f.Index > tpmBase+0xffff {
		return nil, fmt.Errorf("TPM token file is unreadable")
	}
	return &f, nil
}

func (t *TPM) undefine(index uint32) error {
	r, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}).Execute(t.tpm())
	if err != nil {
		return nil // gone already
	}
	_, err = (tpm2.NVUndefineSpace{AuthHandle: tpm2.TPMRHOwner, NVIndex: tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: r.NVName}}).Execute(t.tpm())
	return err
}

// Unwrap implements Backend.
func (t *TPM) Unwrap(_ context.Context, dir, _ string, pin []byte) ([]byte, error) {
	f, err := readTPMFile(dir)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	r, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(f.Index)}).Execute(t.tpm())
	if err != nil {
		return nil, fmt.Errorf("the container's NV index %#x is not in the TPM (wiped, or another TPM)", f.Index)
	}
	nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(f.Index), Name: r.NVName}
	var sess tpm2.Session
	if len(f.PCRs) == 0 {
		sess = tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Auth(pin))
	} else {
		sel := pcrSelection(f.PCRs)
		sess = tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tp transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
			if _, err := (tpm2.PolicyPCR{PolicySession: h, Pcrs: sel}).Execute(tp); err != nil {
				return err
			}
			_, err := (tpm2.PolicyAuthValue{PolicySession: h}).Execute(tp)
			return err
		}, tpm2.Auth(pin))
	}
	rsp, err := (tpm2.NVRead{AuthHandle: tpm2.AuthHandle{Handle: nv.Handle, Name: nv.Name, Auth: sess}, NVIndex: nv, Size: SecretSize}).Execute(t.tpm())
	switch {
	case errors.Is(err, tpm2.TPMRCAuthFail) || errors.Is(err, tpm2.TPMRCBadAuth):
		return nil, ErrWrongPIN
	case errors.Is(err, tpm2.TPMRCLockout):
		return nil, fmt.Errorf("the TPM is in dictionary-attack lockout")
	case errors.Is(err, tpm2.TPMRCPolicyFail) || errors.Is(err, tpm2.TPMRCValue):
		return nil, fmt.Errorf("the PCRs the key is bound to have other values now")
	case err != nil:
		return nil, fmt.Errorf("read the container's NV index: %w", err)
	}
	return rsp.Data.Buffer, nil
}

// Destroy implements Backend: the NV index is undefined.
func (t *TPM) Destroy(_ context.Context, dir, _ string) error {
	f, err := readTPMFile(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	t.mu.Lock()
	err = t.undefine(f.Index)
	t.mu.Unlock()
	if err != nil {
		return fmt.Errorf("undefine the container's NV index: %w", err)
	}
	return os.Remove(filepath.Join(dir, tpmName))
}

// Exists implements Backend.
func (t *TPM) Exists(dir, _ string) bool {
	_, err := os.Stat(filepath.Join(dir, tpmName))
	return err == nil
}
