// Package storage is the start pipeline's storage stage: it unlocks an
// encrypted container's key through its token (internal/token), derives
// the volume key and mounts the container's encrypted, integrity-protected
// volume, under which its writable layer and volumes live (TSF-DATA,
// CR 4.1, CR 4.2). Wipe destroys the key in the token, then the data.
package storage

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/token"
)

func cryptoRand(b []byte) (int, error) { return rand.Read(b) }

// Stage is the storage stage.
type Stage struct {
	Settings *cmlv1.StorageSettings
	// Runs holds each container's storage run directory (mount points).
	Runs string
	// Backends by token type; a type without one is refused.
	Backends map[cmlv1.ContainerTokenType]token.Backend
	Keeper   *token.Keeper
	Audit    audit.Recorder
	Log      *slog.Logger
	// Backend is the volume backend new containers get: backendDM where
	// the kernel has dm-crypt and dm-integrity, else backendGocryptfs.
	Backend string
	// Notify tells the container manager of an integrity failure of a
	// running container's volume (its state reason).
	Notify func(id, reason string)

	mu      sync.Mutex
	running map[string]*volume
	watch   map[string]context.CancelFunc
}

// New returns the storage stage for the device's settings: soft tokens
// always, USB and PKCS11 tokens when a PKCS#11 module is set, TPM tokens
// on the device's TPM (tpmRW; nil: none).
func New(settings *cmlv1.StorageSettings, runs string, rec audit.Recorder, log *slog.Logger, tpmRW io.ReadWriter) *Stage {
	if settings == nil {
		settings = &cmlv1.StorageSettings{}
	}
	st := &Stage{Settings: settings, Runs: runs, Audit: rec, Log: log,
		Keeper:   &token.Keeper{MaxAttempts: int(settings.GetMaxPinAttempts())},
		Backends: map[cmlv1.ContainerTokenType]token.Backend{cmlv1.ContainerTokenType_SOFT: token.Soft{}},
		running:  map[string]*volume{}, watch: map[string]context.CancelFunc{}, Backend: backendGocryptfs}
	if DMCryptAvailable() {
		st.Backend = backendDM
	}
	if m := settings.GetPkcs11Module(); m != "" {
		p := &token.PKCS11{Module: m, Label: settings.GetPkcs11TokenLabel()}
		st.Backends[cmlv1.ContainerTokenType_USB] = p
		st.Backends[cmlv1.ContainerTokenType_PKCS11] = p
	}
	if tpmRW != nil {
		st.Backends[cmlv1.ContainerTokenType_TPM] = &token.TPM{RW: tpmRW, PCRs: settings.GetTpmPcrs()}
	}
	return st
}

// Mode is how a backend protects data, in GyroidOS's terms.
func Mode(backend string) cmlv1.CryptfsMode {
	if backend == "" {
		return cmlv1.CryptfsMode_NOT_IMPLEMENTED
	}
	return cmlv1.CryptfsMode_AUTHENC
}

// Name implements container.Stage.
func (st *Stage) Name() string { return "storage" }

func encrypted(cfg *cmlv1.ContainerConfig) bool {
	return cfg.GetTokenType() != cmlv1.ContainerTokenType_NONE
}

func tokenDir(dir string) string  { return filepath.Join(dir, "token") }
func cipherDir(dir string) string { return filepath.Join(dir, "crypt") }

// backendFile records a container's storage backend; it never switches
// silently.
const backendFile = "backend"

func (st *Stage) backend(cfg *cmlv1.ContainerConfig) (token.Backend, error) {
	b := st.Backends[cfg.GetTokenType()]
	if b == nil {
		return nil, errdefs.FailedPrecondition("token_type %s is not available on this device", cfg.GetTokenType())
	}
	return b, nil
}

// Check implements container.Checker: a device that requires encryption
// refuses unencrypted configs; a token type needs its backend.
func (st *Stage) Check(source string, cfg *cmlv1.ContainerConfig) error {
	if !encrypted(cfg) {
		if st.Settings.GetRequireEncryption() {
			return &config.FieldError{Source: source, Field: "token_type", Msg: "NONE: this device requires encrypted storage for every container (storage.require_encryption)"}
		}
		return nil
	}
	if st.Backends[cfg.GetTokenType()] == nil {
		return &config.FieldError{Source: source, Field: "token_type", Msg: fmt.Sprintf("%s: not available on this device (see docs/storage.md)", cfg.GetTokenType())}
	}
	if _, err := exec.LookPath("gocryptfs"); err != nil && st.Backend == backendGocryptfs {
		return &config.FieldError{Source: source, Field: "token_type", Msg: "encrypted storage needs device-mapper with dm-crypt and dm-integrity, or gocryptfs with FUSE; this device has neither"}
	}
	return nil
}

// Prepare implements container.Stage: unlock (or, on the first start,
// create) the container's key, mount its volume, and point the writable
// layer and volumes into it.
func (st *Stage) Prepare(ctx context.Context, s *container.Start) (any, error) {
	if !encrypted(s.Config) {
		return nil, nil
	}
	b, err := st.backend(s.Config)
	if err != nil {
		return nil, err
	}
	tdir := tokenDir(s.Dir)
	backend := st.Backend
	if rec, err := os.ReadFile(filepath.Join(s.Dir, backendFile)); err == nil {
		backend = strings.TrimSpace(string(rec))
		if backend != backendGocryptfs && backend != backendDM || backend == backendDM && st.Backend != backendDM {
			return nil, errdefs.FailedPrecondition("storage: the container's data is in backend %q, which this device does not offer now", backend)
		}
	}
	var secret []byte
	first := !b.Exists(tdir, s.ID)
	if first {
		secret, err = st.Keeper.Create(ctx, b, tdir, s.ID, s.Secret)
	} else {
		secret, err = st.Keeper.Unlock(ctx, b, tdir, s.ID, s.Secret)
	}
	var ue *token.UnlockError
	if errors.As(err, &ue) {
		st.record(ctx, s, "token.unlock", audit.Failure, b.Name()+" token: "+ue.Detail)
		return nil, errdefs.PermissionDenied("container %s: %s", s.Name, ue.Error())
	}
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	op := "token.unlock"
	if first {
		op = "token.create"
	}
	st.record(ctx, s, op, audit.Success, b.Name()+" token")
	key, err := token.Derive(secret, s.ID, "gocryptfs master key", 32)
	token.Zero(secret)
	if err != nil {
		return nil, err
	}
	run := filepath.Join(st.Runs, s.ID)
	if err := st.closeLeftover(s.ID, run); err != nil {
		return nil, errdefs.FailedPrecondition("storage: container %s: the volume of its last run is still in use: %v", s.Name, err)
	}
	os.RemoveAll(run) // nothing is mounted there (checked above)
	var v *volume
	if backend == backendDM {
		v, err = openDM(ctx, cipherDir(s.Dir), run, s.ID, key, st.Settings.GetVolumeSizeMib())
	} else {
		v, err = openGocryptfs(ctx, cipherDir(s.Dir), run, key, st.Settings.GetVolumeSizeMib())
	}
	token.Zero(key)
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	if first {
		os.WriteFile(filepath.Join(s.Dir, backendFile), []byte(backend+"\n"), 0o600)
	}
	for _, d := range []string{"volumes"} {
		os.MkdirAll(filepath.Join(v.Data, d), 0o755)
	}
	s.DataDir = v.Data
	st.mu.Lock()
	st.running[s.ID] = v
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	st.watch[s.ID] = cancel
	st.mu.Unlock()
	if v.Log != "" {
		go st.watchIntegrity(wctx, s.ID, s.Name, v.Log)
	}
	return v, nil
}

// closeLeftover closes what a release that found the volume busy left
// mounted under a container's run directory; it fails while anything is
// still mounted there (the run directory is never removed across a
// mounted volume).
func (st *Stage) closeLeftover(id, run string) error {
	st.mu.Lock()
	v := st.running[id]
	st.mu.Unlock()
	if v != nil {
		if err := closeVolume(v, filepath.Dir(st.Runs)); err != nil {
			return err
		}
		st.mu.Lock()
		if st.running[id] == v {
			delete(st.running, id)
		}
		st.mu.Unlock()
	}
	if mps, _ := rootfs.MountsUnder(run); len(mps) > 0 {
		return fmt.Errorf("%s is mounted", mps[0])
	}
	return nil
}

// watchIntegrity reports authentication failures gocryptfs logs while
// the container runs: an audit record and the container's state reason.
func (st *Stage) watchIntegrity(ctx context.Context, id, name, log string) {
	var off int64
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	reported := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f, err := os.Open(log)
		if err != nil {
			continue
		}
		f.Seek(off, 0)
		buf := make([]byte, 64<<10)
		n, _ := f.Read(buf)
		f.Close()
		off += int64(n)
		if reported || !strings.Contains(string(buf[:n]), "corrupt") {
			continue
		}
		reported = true
		reason := "storage integrity violation: a block of the encrypted volume failed authentication (tampered or damaged); reads of it fail with EIO"
		st.Audit.Record(ctx, audit.Event{Type: "container", Operation: "storage.integrity", Object: name + "/" + id, Outcome: audit.Failure, Reason: reason})
		if st.Notify != nil {
			st.Notify(id, reason)
		}
	}
}

func (st *Stage) record(ctx context.Context, s *container.Start, op, outcome, reason string) {
	if st.Audit == nil {
		return
	}
	st.Audit.Record(ctx, audit.Event{Type: "container", Operation: op, Subject: audit.SubjectFrom(ctx), Object: s.Name + "/" + s.ID, Outcome: outcome, Reason: reason})
}

// Release implements container.Stage.
func (st *Stage) Release(_ context.Context, id string, raw json.RawMessage) error {
	st.mu.Lock()
	v := st.running[id]
	delete(st.running, id)
	if c := st.watch[id]; c != nil {
		c()
		delete(st.watch, id)
	}
	st.mu.Unlock()
	if v == nil && raw != nil {
		var rec volume
		if json.Unmarshal(raw, &rec) == nil {
			v = &rec
		}
	}
	if v != nil {
		if err := closeVolume(v, filepath.Dir(st.Runs)); err != nil {
			// Still mounted: kept, so that the next start or stop of
			// the container closes it before anything else.
			st.mu.Lock()
			st.running[id] = v
			st.mu.Unlock()
			return err
		}
		return nil
	}
	// No record: a start the daemon did not finish recording.
	CleanupUnder(filepath.Join(st.Runs, id), filepath.Dir(st.Runs), nil)
	if _, err := os.Stat("/dev/mapper/" + dmName(id)); err == nil {
		exec.Command("cryptsetup", "close", dmName(id)).Run()
	}
	return nil
}

// Adopt implements container.Adopter: the volume of a container that
// survived a daemon restart stays mounted in the container (its mounts
// hold it); the stage takes back its gocryptfs process and loop device.
func (st *Stage) Adopt(ctx context.Context, id string, _ int, raw json.RawMessage) error {
	if raw == nil {
		return nil
	}
	var v volume
	if err := json.Unmarshal(raw, &v); err != nil {
		return fmt.Errorf("storage record: %w", err)
	}
	st.mu.Lock()
	st.running[id] = &v
	st.mu.Unlock()
	return nil
}

// Sweep implements container.Sweeper: gocryptfs processes and loop
// devices of runs that no longer run go.
func (st *Stage) Sweep(_ context.Context, alive map[string]bool) error {
	keep := map[string]bool{}
	st.mu.Lock()
	for id, v := range st.running {
		if alive[id] {
			keep[v.Plain] = true
		}
	}
	st.mu.Unlock()
	CleanupUnder(st.Runs, filepath.Dir(st.Runs), keep)
	ents, _ := os.ReadDir(st.Runs)
	for _, e := range ents {
		if !alive[e.Name()] {
			os.RemoveAll(filepath.Join(st.Runs, e.Name()))
		}
	}
	return nil
}

// Remove implements container.Remover: the container's key is destroyed
// in its token, then its encrypted data. For a PKCS#11 token the PIN is
// needed (the key object is private to the logged-in user); a wrong one
// counts like any unlock.
func (st *Stage) Remove(ctx context.Context, r container.Removal) error {
	if !encrypted(r.Config) {
		return nil
	}
	b, err := st.backend(r.Config)
	if err != nil {
		return err
	}
	tdir := tokenDir(r.Dir)
	if p, ok := b.(*token.PKCS11); ok && b.Exists(tdir, r.ID) {
		// Proof of the PIN first (it counts), then the key object goes.
		s, err := st.Keeper.Unlock(ctx, b, tdir, r.ID, r.Secret)
		var ue *token.UnlockError
		if errors.As(err, &ue) {
			st.Audit.Record(ctx, audit.Event{Type: "container", Operation: "token.destroy", Subject: audit.SubjectFrom(ctx), Object: r.Name + "/" + r.ID, Outcome: audit.Failure, Reason: "pkcs11 token: " + ue.Detail})
			return errdefs.PermissionDenied("container %s: %s (a PKCS#11 token's key is destroyed only with its PIN)", r.Name, ue.Error())
		}
		if err != nil {
			return err
		}
		token.Zero(s)
		if err := p.DestroyWithPIN(ctx, tdir, r.ID, r.Secret); err != nil {
			return err
		}
	} else if err := b.Destroy(ctx, tdir, r.ID); err != nil {
		return err
	}
	st.Audit.Record(ctx, audit.Event{Type: "container", Operation: "token.destroy", Subject: audit.SubjectFrom(ctx), Object: r.Name + "/" + r.ID, Outcome: audit.Success, Reason: b.Name() + " token: key destroyed"})
	for _, d := range []string{cipherDir(r.Dir), tdir, filepath.Join(r.Dir, backendFile)} {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	return nil
}

// TokenLocked reports whether a container's token is locked.
func (st *Stage) TokenLocked(dir string) bool { return st.Keeper.Locked(tokenDir(dir)) }

// ResetToken unlocks a locked token (an administrator's act).
func (st *Stage) ResetToken(dir string) error { return st.Keeper.Reset(tokenDir(dir)) }

// ChangePIN re-wraps the container's key under a new PIN.
func (st *Stage) ChangePIN(ctx context.Context, id, name, dir string, cfg *cmlv1.ContainerConfig, oldPIN, newPIN []byte) error {
	if !encrypted(cfg) {
		return errdefs.FailedPrecondition("container %s has no token (token_type NONE)", name)
	}
	b, err := st.backend(cfg)
	if err != nil {
		return err
	}
	err = st.Keeper.ChangePIN(ctx, b, tokenDir(dir), id, oldPIN, newPIN)
	var ue *token.UnlockError
	if errors.As(err, &ue) {
		st.Audit.Record(ctx, audit.Event{Type: "container", Operation: "token.change_pin", Subject: audit.SubjectFrom(ctx), Object: name + "/" + id, Outcome: audit.Failure, Reason: b.Name() + " token: " + ue.Detail})
		return errdefs.PermissionDenied("container %s: %s", name, ue.Error())
	}
	outcome, reason := audit.Success, b.Name()+" token: PIN changed"
	if err != nil {
		outcome, reason = audit.Failure, err.Error()
	}
	st.Audit.Record(ctx, audit.Event{Type: "container", Operation: "token.change_pin", Subject: audit.SubjectFrom(ctx), Object: name + "/" + id, Outcome: outcome, Reason: reason})
	return err
}

var (
	_ container.Stage   = (*Stage)(nil)
	_ container.Adopter = (*Stage)(nil)
	_ container.Remover = (*Stage)(nil)
	_ container.Checker = (*Stage)(nil)
	_ container.Sweeper = (*Stage)(nil)
)
