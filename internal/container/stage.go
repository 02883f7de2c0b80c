package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/oci"
)

// Stage is one step of the start pipeline. The daemon wires the stages, in
// order, into Options.Stages; the manager runs them for every start and
// undoes them, in reverse, after a failed start, after init exits, and
// after a daemon restart for runs that no longer run. Today's stages:
// verify (config and image, or dm-verity), devices (exclusive
// assignment), rootfs, network, measure (TPM). Storage plugs in as one
// more.
type Stage interface {
	// Name identifies the stage in the run record, logs and timings.
	Name() string
	// Prepare does the stage's part of a start. What it returns is kept
	// in the run record (as JSON) and handed to Release. On error Prepare
	// leaves nothing behind; the stages before it are released.
	Prepare(ctx context.Context, s *Start) (record any, err error)
	// Release undoes Prepare for container id. record is what Prepare
	// returned, or nil when the daemon died before it was recorded:
	// Release then sweeps whatever the stage may have left for id. It
	// must be idempotent.
	Release(ctx context.Context, id string, record json.RawMessage) error
}

// Adopter is a Stage that takes back its part of a run that survived a
// daemon restart (re-reserving devices, remembering a measurement).
type Adopter interface {
	Adopt(ctx context.Context, id string, pid int, record json.RawMessage) error
}

// Checker is a Stage with settings of its own a config must fit (the
// device's network plan, say); the manager asks it at create and
// update-config, so that a config that could never start is refused
// before it is stored.
type Checker interface {
	Check(source string, cfg *cmlv1.ContainerConfig) error
}

// Sweeper is a Stage that clears what runs no longer running left behind
// in places only it knows (kernel firewall rules, network links). The
// manager calls Sweep once after a daemon start, when every run that
// survived has been adopted; alive holds their container ids.
type Sweeper interface {
	Sweep(ctx context.Context, alive map[string]bool) error
}

// Remover is a Stage with per-container state that outlives runs (a
// wrapped storage key, say); Remove destroys it when the container is
// removed or wiped, before its data. An error stops the removal.
type Remover interface {
	Remove(ctx context.Context, r Removal) error
}

// Removal is a container being removed or wiped.
type Removal struct {
	ID, Name string
	Dir      string // persistent state directory
	Config   *cmlv1.ContainerConfig
	// Secret proves the caller may destroy a token's key (a PIN); nil
	// when none was sent.
	Secret []byte
}

// Start is one start going through the pipeline: the input every stage
// sees, and what earlier stages produced for later ones.
type Start struct {
	ID     string
	Name   string
	Config *cmlv1.ContainerConfig
	// Dir is the container's persistent state directory; RunDir its
	// per-run directory (bundle, mounts).
	Dir    string
	RunDir string
	// Accepted and Trust are what the container's config was accepted
	// with; the verify stage checks the stored config against them.
	Accepted time.Time
	Trust    cmlv1.TrustLevel
	// UIDBase and IDCount are the container's user namespace range
	// (IDCount 0: no user namespace).
	UIDBase, IDCount uint32
	// Slot is the container's stable index among all containers (it also
	// picks its id range and its network link).
	Slot uint32
	// Secret unlocks the container's storage (a PIN); nil when the
	// client sent none. Stages must not log or record it.
	Secret []byte

	// Set by the verify stage: the guest OS, the exact config bytes that
	// were verified, and the verified image to mount.
	GuestOS    *guestos.GuestOS
	ConfigText []byte
	Image      string
	// DataDir, set by the storage stage for an encrypted container, is
	// where the writable layer and the volumes live (default: Dir/data
	// and Dir/volumes).
	DataDir string
	// Set by the rootfs stage.
	Rootfs string
	// Mounts and Devices are added to the spec; NetNSPath, when set, is a
	// network namespace the host prepared that init joins.
	Mounts    []oci.Mount
	NetNSPath string

	done []func()
}

// OnDone registers f to run when the start has finished, successfully or
// not (closing a verified image descriptor once it is mounted, say).
func (s *Start) OnDone(f func()) { s.done = append(s.done, f) }

func (s *Start) finish() {
	for i := len(s.done) - 1; i >= 0; i-- {
		s.done[i]()
	}
	s.done = nil
}

// Timing is how long one stage of a start took.
type Timing struct {
	Stage string        `json:"stage"`
	Took  time.Duration `json:"took_ns"`
}

// prepare runs the stages in order. On error the stages already prepared
// are released in reverse and nothing of the start remains.
func (m *Manager) prepare(ctx context.Context, s *Start) (map[string]json.RawMessage, []Timing, error) {
	records := map[string]json.RawMessage{}
	var timings []Timing
	for i, st := range m.o.Stages {
		// A client that went away stops the start before the next step,
		// and in particular before anything is measured or run.
		if err := ctx.Err(); err != nil {
			m.releaseStages(context.WithoutCancel(ctx), s.ID, m.o.Stages[:i], records)
			return nil, timings, err
		}
		t0 := time.Now()
		rec, err := st.Prepare(ctx, s)
		timings = append(timings, Timing{Stage: st.Name(), Took: time.Since(t0)})
		if err != nil {
			m.releaseStages(context.WithoutCancel(ctx), s.ID, m.o.Stages[:i], records)
			return nil, timings, err
		}
		if rec != nil {
			b, err := json.Marshal(rec)
			if err != nil {
				m.releaseStages(context.WithoutCancel(ctx), s.ID, m.o.Stages[:i+1], records)
				return nil, timings, fmt.Errorf("stage %s: record: %w", st.Name(), err)
			}
			records[st.Name()] = b
		}
	}
	return records, timings, nil
}

// releaseStages releases stages in reverse order with their records.
func (m *Manager) releaseStages(ctx context.Context, id string, stages []Stage, records map[string]json.RawMessage) error {
	var errs []error
	for i := len(stages) - 1; i >= 0; i-- {
		if err := stages[i].Release(ctx, id, records[stages[i].Name()]); err != nil {
			errs = append(errs, fmt.Errorf("release %s: %w", stages[i].Name(), err))
		}
	}
	return errors.Join(errs...)
}
