package container

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/tpm"
)

// VerifyStage checks, before every start, that the stored config is the
// one that was accepted and is still trusted, and that the guest OS image
// matches its signed manifest (TSF-INIT: verify before every start, not
// only at install). With device-mapper the image is mapped through
// dm-verity and the kernel checks each block as it is read; otherwise
// every block is checked now and the very file that was checked is
// mounted, through its open descriptor.
type VerifyStage struct {
	GuestOS *guestos.Store
	Configs Acceptor
	// Refused is told of every integrity refusal (for the audit trail);
	// its error, when not nil, is returned instead.
	Refused func(ctx context.Context, s *Start, err error) error
}

// Name implements Stage.
func (v *VerifyStage) Name() string { return "verify" }

type verifyRecord struct {
	Verity string `json:"verity,omitempty"` // dm-verity mapping name
}

// Prepare implements Stage.
func (v *VerifyStage) Prepare(ctx context.Context, s *Start) (any, error) {
	g, err := v.GuestOS.Get(s.Config.GetGuestOs(), s.Config.GetGuestosVersion())
	if err != nil {
		return nil, err
	}
	refuse := func(err error) error {
		if v.Refused != nil {
			if rerr := v.Refused(ctx, s, err); rerr != nil {
				return rerr
			}
		}
		return err
	}
	// The config and the image are independent checks: run them at once.
	type checked struct {
		text []byte
		err  error
	}
	cfgDone := make(chan checked, 1)
	go func() {
		text, err := v.Configs.Recheck(s.Dir, s.Name, s.Config, s.Trust, s.Accepted)
		cfgDone <- checked{text, err}
	}()
	var (
		rec   any
		image string
		undo  func()
		ierr  error
	)
	if v.GuestOS.UsesDMVerity() {
		name := verityName(s.ID)
		image, ierr = v.GuestOS.OpenVerity(ctx, g, name)
		rec, undo = verifyRecord{Verity: name}, func() { guestos.CloseVerity(name) }
	} else {
		var f *os.File
		if f, ierr = v.GuestOS.Check(ctx, g); ierr == nil {
			image, undo = fmt.Sprintf("/proc/self/fd/%d", f.Fd()), func() { f.Close() }
			s.OnDone(func() { f.Close() })
		}
	}
	cfg := <-cfgDone
	if cfg.err != nil {
		if ierr == nil {
			undo()
		}
		return nil, refuse(cfg.err)
	}
	if ierr != nil {
		return nil, refuse(ierr)
	}
	s.GuestOS, s.ConfigText, s.Image = g, cfg.text, image
	return rec, nil
}

// Release implements Stage: it closes the dm-verity mapping, if any.
func (v *VerifyStage) Release(_ context.Context, id string, _ json.RawMessage) error {
	if v.GuestOS.UsesDMVerity() {
		guestos.CloseVerity(verityName(id))
	}
	return nil
}

// verityName names a container's dm-verity mapping (/dev/mapper/<name>).
func verityName(id string) string { return "cml-" + id }

// DeviceStage keeps exclusively assigned devices exclusive (TSF-DEV):
// while a running container holds a device through assign_dev, no other
// running container may have any rule (allow_dev or assign_dev, wildcard
// minors included) that covers it, and a container whose rules cover a
// device another running container holds does not start. It has its own
// lock; nothing slow happens under it.
type DeviceStage struct {
	mu      sync.Mutex
	running map[string]deviceUse // by container id
}

// deviceUse is what one running container holds and may open.
type deviceUse struct {
	Name     string   `json:"name"`
	Assigned []string `json:"assigned"`
	Allowed  []string `json:"allowed"`
}

// NewDeviceStage returns a DeviceStage with no device assigned.
func NewDeviceStage() *DeviceStage { return &DeviceStage{running: map[string]deviceUse{}} }

// Name implements Stage.
func (d *DeviceStage) Name() string { return "devices" }

// overlap reports whether two device rules can match the same device.
func overlap(a, b config.DeviceRule) bool {
	return a.Type == b.Type && (a.Major < 0 || b.Major < 0 || a.Major == b.Major) && (a.Minor < 0 || b.Minor < 0 || a.Minor == b.Minor)
}

func parseRules(rules []string) []config.DeviceRule {
	var out []config.DeviceRule
	for _, r := range rules {
		if d, err := config.ParseDeviceRule(r); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// conflict returns a description of the first device that use a holds
// and use b may open, or the other way round.
func conflict(a, b deviceUse) (string, bool) {
	for _, held := range parseRules(a.Assigned) {
		for _, r := range parseRules(append(append([]string(nil), b.Assigned...), b.Allowed...)) {
			if overlap(held, r) {
				return deviceKey(held), true
			}
		}
	}
	return "", false
}

// deviceKey names a device for messages.
func deviceKey(r config.DeviceRule) string { return fmt.Sprintf("%s %d:%d", r.Type, r.Major, r.Minor) }

// Prepare implements Stage.
func (d *DeviceStage) Prepare(_ context.Context, s *Start) (any, error) {
	use := deviceUse{Name: s.Name, Assigned: s.Config.GetAssignDev(), Allowed: s.Config.GetAllowDev()}
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, other := range d.running {
		if id == s.ID {
			continue
		}
		if dev, ok := conflict(other, use); ok {
			return nil, errdefs.FailedPrecondition("device %s is assigned to running container %s", dev, other.Name)
		}
		if dev, ok := conflict(use, other); ok {
			return nil, errdefs.FailedPrecondition("device %s, which %s would hold exclusively, is open to running container %s", dev, s.Name, other.Name)
		}
	}
	d.running[s.ID] = use
	return use, nil
}

// Release implements Stage.
func (d *DeviceStage) Release(_ context.Context, id string, _ json.RawMessage) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.running, id)
	return nil
}

// Adopt implements Adopter: a re-adopted container keeps its devices.
func (d *DeviceStage) Adopt(_ context.Context, id string, _ int, rec json.RawMessage) error {
	var use deviceUse
	if len(rec) > 0 && json.Unmarshal(rec, &use) != nil {
		// A run recorded before allow rules were tracked: its assigned
		// device keys only.
		if err := json.Unmarshal(rec, &use.Assigned); err != nil {
			return err
		}
		for i, k := range use.Assigned {
			use.Assigned[i] = k + " rwm"
		}
	}
	if use.Name == "" {
		use.Name = id
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.running[id] = use
	return nil
}

// RootfsStage mounts the verified image, idmapped to the container's id
// range, under an overlay whose upper layer is the container's data.
type RootfsStage struct {
	// Runs is the directory holding each container's run directory.
	Runs string
}

// Name implements Stage.
func (*RootfsStage) Name() string { return "rootfs" }

// Prepare implements Stage.
func (*RootfsStage) Prepare(_ context.Context, s *Start) (any, error) {
	data := filepath.Join(s.Dir, "data")
	if s.DataDir != "" {
		data = s.DataDir
	}
	req := rootfs.Request{Image: s.Image, FSType: s.GuestOS.Root().GetFsType(), DataDir: data,
		ReadOnly: s.Config.GetReadonlyRootfs(), UIDBase: s.UIDBase, IDCount: s.IDCount}
	rfs, err := rootfs.Mount(s.RunDir, req)
	if err != nil {
		// Through dm-verity, an I/O error is the kernel refusing a block
		// that does not match the signed hash tree: an integrity
		// violation, not an environment problem.
		if strings.HasPrefix(s.Image, "/dev/mapper/") && errors.Is(err, syscall.EIO) {
			return nil, errdefs.Integrity("guestos %s %d: image blocks do not match the signed hash tree (dm-verity refused a read)", s.GuestOS.Name(), s.GuestOS.Version())
		}
		return nil, fmt.Errorf("root filesystem: %w", err)
	}
	s.Rootfs = rfs
	return nil, nil
}

// Release implements Stage: it unmounts everything under the run
// directory, which needs nothing but the directory.
func (r *RootfsStage) Release(_ context.Context, id string, _ json.RawMessage) error {
	return rootfs.Unmount(filepath.Join(r.Runs, id))
}

// Measurer records a container start in the TPM and its event log.
type Measurer interface {
	Measure(ctx context.Context, e tpm.Event) error
}

// MeasureStage measures what is about to run into the TPM: guest OS name
// and version, its root image's verity root hash (pinned by the signed
// manifest) and the digest of the exact config bytes just verified. A
// start that cannot be measured does not happen. It remembers the event of
// every running container so they can be measured again after a PCR
// reset.
type MeasureStage struct {
	TPM Measurer
	// Refused is told of a failed measurement (for the audit trail).
	Refused func(ctx context.Context, s *Start, err error) error

	mu      sync.Mutex
	running map[string]tpm.Event
}

// Name implements Stage.
func (ms *MeasureStage) Name() string { return "measure" }

// Prepare implements Stage.
func (ms *MeasureStage) Prepare(ctx context.Context, s *Start) (any, error) {
	ev := measurement(s.ID, s.Config, s.GuestOS, s.ConfigText)
	if err := ms.TPM.Measure(ctx, ev); err != nil {
		// Of class Unavailable: the start is refused because the TPM or
		// its log cannot take the measurement, not because of the input.
		err = errdefs.Wrap(errdefs.ErrUnavailable, err, "measure into the TPM")
		if ms.Refused != nil {
			if rerr := ms.Refused(ctx, s, err); rerr != nil {
				return nil, rerr
			}
		}
		return nil, err
	}
	ms.remember(s.ID, ev)
	return ev, nil
}

func (ms *MeasureStage) remember(id string, ev tpm.Event) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.running == nil {
		ms.running = map[string]tpm.Event{}
	}
	ms.running[id] = ev
}

// Release implements Stage. A PCR extension cannot be undone; the
// container just stops being re-measured.
func (ms *MeasureStage) Release(_ context.Context, id string, _ json.RawMessage) error {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	delete(ms.running, id)
	return nil
}

// Adopt implements Adopter.
func (ms *MeasureStage) Adopt(_ context.Context, id string, _ int, rec json.RawMessage) error {
	var ev tpm.Event
	if len(rec) == 0 {
		return nil
	}
	if err := json.Unmarshal(rec, &ev); err != nil {
		return err
	}
	ms.remember(id, ev)
	return nil
}

// MeasureRunning measures every running container again. The daemon calls
// it when the TPM's PCRs were reset under running containers (cmld's own
// swtpm restarted), so an attestation still shows what runs.
func (ms *MeasureStage) MeasureRunning(ctx context.Context) error {
	ms.mu.Lock()
	evs := make([]tpm.Event, 0, len(ms.running))
	for _, e := range ms.running {
		evs = append(evs, e)
	}
	ms.mu.Unlock()
	for _, e := range evs {
		if err := ms.TPM.Measure(ctx, e); err != nil {
			return fmt.Errorf("re-measure container %s: %w", e.Name, err)
		}
	}
	return nil
}

// measurement is the TPM event for a start.
func measurement(uuid string, cfg *cmlv1.ContainerConfig, g *guestos.GuestOS, cfgText []byte) tpm.Event {
	sum := sha256.Sum256(cfgText)
	return tpm.Event{Container: uuid, Name: cfg.GetName(), GuestOS: g.Name(), Version: g.Version(),
		VerityRoot: g.Root().GetVerityRootHash(), ConfigSHA256: hex.EncodeToString(sum[:])}
}
