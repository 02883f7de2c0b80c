// Package container is the container lifecycle: it creates, starts, stops,
// freezes and removes containers, keeps their configs and state on disk,
// watches their init processes, and re-adopts running containers after the
// daemon restarts.
//
// A container's state changes only through one checked update (state.go)
// that knows the run generation, so a stale writer (a freeze racing init's
// exit, a start queued behind a removal) cannot overwrite a newer fact.
// Starting is a pipeline of stages (stage.go) that the daemon wires:
// verification, devices, root filesystem and measurement today, storage and
// network next; release, recovery and removal are the same stages in
// reverse. The OCI runtime is behind an interface (runtime.go).
//
// Locks: Manager.mu guards the container table and every container's
// mutable fields and is never held across disk, TPM, network or runtime
// calls. Each container's op mutex serializes the operations on that
// container only. This package does not authorize callers (the API layer
// does) and has no namespace code of its own.
package container

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/reaper"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/trust"
)

// Options configure a Manager.
type Options struct {
	// StateDir holds one directory per container: config, metadata and
	// the writable data layer. It persists across reboots.
	StateDir string
	// RunDir holds per-run state: bundles and mounts. It may be a tmpfs.
	RunDir  string
	Runtime Runtime
	Exits   Exits
	GuestOS *guestos.Store
	Audit   audit.Recorder
	Log     *slog.Logger
	Now     func() time.Time
	// IDBase and IDCount define subordinate id ranges: container slot n
	// maps to IDBase + n*IDCount.
	IDBase  uint32
	IDCount uint32
	// CgroupParent is the cgroup under which containers are placed.
	CgroupParent string
	// ConsoleSize bounds each container's console ring buffer.
	ConsoleSize int
	// ConsoleRate is how many bytes per second of a container's console
	// output cmld reads (default 1 MiB/s, with a burst of as much); a
	// container writing faster blocks on its full console pipe.
	ConsoleRate int
	// Configs accepts configs at create and update.
	Configs Acceptor
	// Stages is the start pipeline, in order.
	Stages []Stage
}

// Manager manages all containers of the daemon.
type Manager struct {
	o          Options
	mu         sync.Mutex // guards containers, reserved and every container's mutable fields
	containers map[string]*Container
	reserved   map[string]bool          // names and slots ("#n") of creates and renames in flight
	creating   map[string]chan struct{} // closed when the create of that name in flight ends
	events     *broker
	wg         sync.WaitGroup
}

// Container is one managed container. Its fields below op are guarded by
// the Manager's mu; op serializes lifecycle operations on it.
type Container struct {
	uuid    string
	slot    uint32
	created time.Time
	console *ring
	op      sync.Mutex

	cfg     *cmlv1.ContainerConfig // replaced, never modified
	state   State
	reason  string
	gen     uint64 // run generation: each start begins a new one
	removed bool
	dirty   bool // a release failed: the next start clears up first
	run     *run // non-nil while the container has runtime state
	exit    reaper.Exit
	exited  bool // exit is of a previous run
	started time.Time
	version uint64           // guest OS version of the current run
	trust   cmlv1.TrustLevel // of the config
	gtrust  cmlv1.TrustLevel // of the guest OS last checked
	signer  string
	// accepted is when the config's signature was checked; re-checks use
	// this time so only revocation or a removed CA, not expiry, stop it.
	accepted time.Time
}

// meta is what never changes about a container. (Containers stored
// before versioned configs also kept their acceptance here.)
type meta struct {
	UUID     string           `json:"uuid"`
	Slot     uint32           `json:"slot"`
	Created  time.Time        `json:"created"`
	Accepted time.Time        `json:"accepted,omitzero"`
	Trust    cmlv1.TrustLevel `json:"trust,omitempty"`
	Signer   string           `json:"signer,omitempty"`
}

// New returns a Manager; call Recover before serving requests.
func New(o Options) (*Manager, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.IDBase == 0 {
		o.IDBase = 100000
	}
	if o.IDCount == 0 {
		o.IDCount = 65536
	}
	if o.CgroupParent == "" {
		o.CgroupParent = "cml"
	}
	if o.ConsoleSize == 0 {
		o.ConsoleSize = 256 << 10
	}
	if o.ConsoleRate == 0 {
		o.ConsoleRate = 1 << 20
	}
	if o.Runtime == nil || o.Exits == nil || o.Audit == nil || o.GuestOS == nil {
		return nil, fmt.Errorf("container manager needs a runtime, an exit source, an audit recorder and a guest OS store")
	}
	for _, d := range []string{o.StateDir, filepath.Join(o.RunDir, "containers")} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, err
		}
	}
	return &Manager{o: o, containers: map[string]*Container{}, reserved: map[string]bool{}, creating: map[string]chan struct{}{}, events: newBroker()}, nil
}

func (m *Manager) containerDir(id string) string { return filepath.Join(m.o.StateDir, id) }
func (m *Manager) runDir(id string) string       { return filepath.Join(m.o.RunDir, "containers", id) }

// load reads every container from the state directory.
func (m *Manager) load() (map[string]*Container, error) {
	ents, err := os.ReadDir(m.o.StateDir)
	if err != nil {
		return nil, err
	}
	out := map[string]*Container{}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		if _, err := uuid.Parse(e.Name()); err != nil {
			// Leftover of an interrupted create or remove.
			os.RemoveAll(filepath.Join(m.o.StateDir, e.Name()))
			continue
		}
		c, err := m.loadOne(e.Name())
		if err != nil {
			return nil, fmt.Errorf("container %s: %w", e.Name(), err)
		}
		out[c.uuid] = c
	}
	return out, nil
}

func (m *Manager) loadOne(id string) (*Container, error) {
	dir := m.containerDir(id)
	mb, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return nil, err
	}
	var md meta
	if err := json.Unmarshal(mb, &md); err != nil {
		return nil, fmt.Errorf("meta.json: %w", err)
	}
	cdir := storedConfigDir(dir)
	text, err := os.ReadFile(filepath.Join(cdir, configFile))
	if err != nil {
		return nil, err
	}
	cfg, err := config.ParseContainer(filepath.Join(cdir, configFile), text)
	if err != nil {
		return nil, err
	}
	acc, err := readAcceptance(dir, md)
	if err != nil {
		return nil, err
	}
	c := &Container{uuid: id, slot: md.Slot, created: md.Created, cfg: cfg, state: Stopped, console: newRing(m.o.ConsoleSize),
		trust: acc.Trust, signer: acc.Signer, accepted: acc.Accepted, gtrust: cmlv1.TrustLevel_SIGNED}
	if g, err := m.o.GuestOS.Get(cfg.GetGuestOs(), cfg.GetGuestosVersion()); err == nil {
		c.gtrust = g.Installed.Level
	}
	return c, nil
}

// lookup finds a container by name or UUID.
func (m *Manager) lookup(ref string) (*Container, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lookupLocked(ref)
}

func (m *Manager) lookupLocked(ref string) (*Container, error) {
	if c, ok := m.containers[ref]; ok {
		return c, nil
	}
	for _, c := range m.containers {
		if c.cfg.GetName() == ref {
			return c, nil
		}
	}
	return nil, errdefs.NotFound("container %q does not exist", ref)
}

// acquire looks a container up and takes its operation lock. A container
// removed while the caller waited for the lock is reported as not found:
// nothing may act on it any more.
func (m *Manager) acquire(ref string) (*Container, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	m.mu.Lock()
	removed := c.removed
	m.mu.Unlock()
	if removed {
		c.op.Unlock()
		return nil, errdefs.NotFound("container %q does not exist (it was removed)", ref)
	}
	return c, nil
}

// info returns the API view of c; m.mu must be held.
func (m *Manager) info(c *Container) *cmlv1.Container {
	out := &cmlv1.Container{
		Uuid:       proto.String(c.uuid),
		Name:       proto.String(c.cfg.GetName()),
		State:      c.state.Enum(),
		GuestOs:    proto.String(c.cfg.GetGuestOs()),
		ExitStatus: proto.Int32(-1),
		Autostart:  proto.Bool(c.cfg.GetAllowAutostart()),
	}
	if c.exited && c.exit.Known {
		if c.exit.Signal != 0 {
			out.ExitSignal = proto.Int32(int32(c.exit.Signal))
		} else {
			out.ExitStatus = proto.Int32(int32(c.exit.Code))
		}
	}
	if c.reason != "" {
		out.Reason = proto.String(c.reason)
	}
	if c.version != 0 {
		out.GuestosVersion = proto.Uint64(c.version)
	} else if v := c.cfg.GetGuestosVersion(); v != 0 {
		out.GuestosVersion = proto.Uint64(v)
	}
	if c.run != nil && c.run.pid > 0 {
		out.Pid = proto.Int32(int32(c.run.pid))
		out.StartedUnixNano = proto.Int64(c.started.UnixNano())
	}
	if c.cfg.GetUserns() {
		out.UidBase = proto.Uint32(m.uidBase(c.slot))
	}
	out.TrustLevel = min(c.trust, c.gtrust).Enum()
	if c.signer != "" {
		out.ConfigSigner = proto.String(c.signer)
	}
	return out
}

func (m *Manager) uidBase(slot uint32) uint32 { return m.o.IDBase + slot*m.o.IDCount }

// publishLocked sends c's current view to subscribers; m.mu must be held.
func (m *Manager) publishLocked(c *Container) {
	m.events.publish(&cmlv1.Event{TimeUnixNano: proto.Int64(m.o.Now().UnixNano()), Container: m.info(c)})
}

// List returns every container, ordered by name.
func (m *Manager) List() []*cmlv1.Container {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*cmlv1.Container, 0, len(m.containers))
	for _, c := range m.containers {
		out = append(out, m.info(c))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out
}

// State returns one container.
func (m *Manager) State(ref string) (*cmlv1.Container, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, err := m.lookupLocked(ref)
	if err != nil {
		return nil, err
	}
	return m.info(c), nil
}

// Peer describes another container to a stage: its id, name, slot and
// config.
func (m *Manager) Peer(ref string) (id, name string, slot uint32, cfg *cmlv1.ContainerConfig, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, err := m.lookupLocked(ref)
	if err != nil {
		return "", "", 0, nil, err
	}
	return c.uuid, c.cfg.GetName(), c.slot, c.cfg, nil
}

// Config returns a container's stored config.
func (m *Manager) Config(ref string) (*cmlv1.ContainerConfig, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, err := m.lookupLocked(ref)
	if err != nil {
		return nil, err
	}
	return proto.Clone(c.cfg).(*cmlv1.ContainerConfig), nil
}

// checkConfig validates cfg against the daemon's state: the guest OS exists
// and the memory limit is not under its minimum.
func (m *Manager) checkConfig(source string, cfg *cmlv1.ContainerConfig) (*guestos.GuestOS, error) {
	if err := config.ValidateContainer(source, cfg); err != nil {
		return nil, err
	}
	if cfg.GetAllowSystemTime() && cfg.GetUserns() {
		return nil, errdefs.InvalidArgument("%s: field allow_system_time: needs userns: false (the kernel checks CAP_SYS_TIME in the initial user namespace)", source)
	}
	for _, st := range m.o.Stages {
		if ch, ok := st.(Checker); ok {
			if err := ch.Check(source, cfg); err != nil {
				return nil, err
			}
		}
	}
	g, err := m.o.GuestOS.Get(cfg.GetGuestOs(), cfg.GetGuestosVersion())
	if err != nil {
		return nil, err
	}
	if min := g.Config.GetMinRamLimit(); cfg.GetRamLimit() != 0 && cfg.GetRamLimit() < min {
		return nil, errdefs.InvalidArgument("%s: field ram_limit: %d MiB is under guest OS %s's minimum of %d MiB", source, cfg.GetRamLimit(), g.Name(), min)
	}
	return g, nil
}

// accept checks a config file's signature and its content against the
// daemon's state.
func (m *Manager) accept(f ConfigFile, now time.Time) (*cmlv1.ContainerConfig, trust.Result, *guestos.GuestOS, error) {
	cfg, res, err := m.o.Configs.Accept(f, now)
	if err != nil {
		return nil, res, nil, err
	}
	g, err := m.checkConfig(f.Source, cfg)
	return cfg, res, g, err
}

// sameConfig reports whether c's stored config is exactly f: the same
// bytes, signature and chain.
func (m *Manager) sameConfig(c *Container, f ConfigFile) bool {
	dir := storedConfigDir(m.containerDir(c.uuid))
	for name, want := range map[string][]byte{configFile: f.Text, configFile + sign.SigSuffix: f.Sig, configFile + sign.CertSuffix: f.Pem} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return false
		}
		if !bytes.Equal(got, want) {
			return false
		}
	}
	return true
}

// reserveName claims name for a create or rename in flight; m.mu must be
// held. self is the container being renamed (nil for a create).
func (m *Manager) reserveNameLocked(name string, self *Container) error {
	if other, err := m.lookupLocked(name); (err == nil && other != self) || m.reserved[name] {
		return errdefs.AlreadyExists("container %q already exists", name)
	}
	m.reserved[name] = true
	return nil
}

// Create stores a new container from a config file. The files are written
// without the manager lock; the name and id range are reserved meanwhile.
func (m *Manager) Create(ctx context.Context, f ConfigFile) (*cmlv1.Container, error) {
	now := m.o.Now()
	cfg, res, g, err := m.accept(f, now)
	if err != nil {
		return nil, err
	}
	name := cfg.GetName()
	m.mu.Lock()
	if err := m.reserveNameLocked(name, nil); err != nil {
		existing, _ := m.lookupLocked(name)
		inFlight := m.creating[name]
		m.mu.Unlock()
		// A client that lost its connection retries (or two restores
		// of one backup run): the identical config (and signature)
		// already stored is success, not an error — also when the
		// other create is still under way.
		if existing == nil && inFlight != nil {
			select {
			case <-inFlight:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			m.mu.Lock()
			existing, _ = m.lookupLocked(name)
			m.mu.Unlock()
		}
		if existing != nil && m.sameConfig(existing, f) {
			return m.State(existing.uuid)
		}
		return nil, err
	}
	done := make(chan struct{})
	m.creating[name] = done
	used := map[uint32]bool{}
	for _, c := range m.containers {
		used[c.slot] = true
	}
	var slot uint32
	for used[slot] || m.reserved[fmt.Sprintf("#%d", slot)] {
		slot++
	}
	slotKey := fmt.Sprintf("#%d", slot)
	m.reserved[slotKey] = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.reserved, name)
		delete(m.reserved, slotKey)
		delete(m.creating, name)
		m.mu.Unlock()
		close(done)
	}()
	if uint64(m.o.IDBase)+uint64(slot+1)*uint64(m.o.IDCount) > 1<<32-1 {
		return nil, errdefs.FailedPrecondition("no subordinate id range left for another container")
	}
	id := uuid.NewString()
	// Write into a temporary directory and rename: a crash leaves either
	// nothing or a complete container (load sweeps the temporary name).
	tmp, err := os.MkdirTemp(m.o.StateDir, ".new-")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	acc := acceptance{Accepted: now.UTC(), Trust: res.Level, Signer: res.Signer}
	if err := writeConfig(tmp, f, acc); err != nil {
		return nil, err
	}
	md := meta{UUID: id, Slot: slot, Created: now.UTC()}
	mb, _ := json.Marshal(md)
	if err := atomicfile.Write(filepath.Join(tmp, "meta.json"), mb, 0o600); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, m.containerDir(id)); err != nil {
		return nil, err
	}
	ok = true
	c := &Container{uuid: id, slot: slot, created: md.Created, cfg: cfg, state: Stopped, console: newRing(m.o.ConsoleSize),
		trust: res.Level, signer: res.Signer, accepted: acc.Accepted, gtrust: g.Installed.Level, reason: "created"}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.containers[id] = c
	m.publishLocked(c)
	return m.info(c), nil
}

// UnsignedConfigFile renders a config message as an unsigned config file.
func UnsignedConfigFile(cfg *cmlv1.ContainerConfig, source string) (ConfigFile, error) {
	text, err := prototext.MarshalOptions{Multiline: true}.Marshal(cfg)
	return ConfigFile{Source: source, Text: text}, err
}

// UpdateConfig replaces a container's config; it takes effect at the next
// start.
func (m *Manager) UpdateConfig(ctx context.Context, ref string, f ConfigFile) (*cmlv1.Container, error) {
	if f.Source == "" {
		f.Source = "config of " + ref
	}
	now := m.o.Now()
	cfg, res, g, err := m.accept(f, now)
	if err != nil {
		return nil, err
	}
	c, err := m.acquire(ref)
	if err != nil {
		return nil, err
	}
	defer c.op.Unlock()
	name := cfg.GetName()
	m.mu.Lock()
	if err := m.reserveNameLocked(name, c); err != nil {
		m.mu.Unlock()
		return nil, err
	}
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.reserved, name)
		m.mu.Unlock()
	}()
	// One unit: a failure leaves the old config, signature and acceptance.
	acc := acceptance{Accepted: now.UTC(), Trust: res.Level, Signer: res.Signer}
	if err := writeConfig(m.containerDir(c.uuid), f, acc); err != nil {
		return nil, fmt.Errorf("container %s: store config: %w", ref, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	c.cfg = cfg
	c.trust, c.signer, c.accepted, c.gtrust = res.Level, res.Signer, acc.Accepted, g.Installed.Level
	m.publishLocked(c)
	return m.info(c), nil
}

// Remove deletes a stopped container and all its data. The container
// leaves the table at once; its files are deleted without the manager lock.
func (m *Manager) Remove(ctx context.Context, ref string, secret []byte) error {
	c, err := m.acquire(ref)
	if err != nil {
		return err
	}
	defer c.op.Unlock()
	m.mu.Lock()
	name := c.cfg.GetName()
	if hasRun(c.state) {
		s := c.state
		m.mu.Unlock()
		return errdefs.FailedPrecondition("container %s is %s; stop it first", name, s)
	}
	cfg := c.cfg
	m.mu.Unlock()
	// Recorded before anything irreversible happens: a removal the trail
	// cannot hold does not happen.
	if err := m.record(ctx, "container.remove", c.uuid, name, nil, ""); err != nil {
		return err
	}
	// Stages with per-container state (a wrapped key) go next: a failure
	// there keeps the container's files.
	rm := Removal{ID: c.uuid, Name: name, Dir: m.containerDir(c.uuid), Config: cfg, Secret: secret}
	for _, st := range m.o.Stages {
		if r, ok := st.(Remover); ok {
			if err := r.Remove(ctx, rm); err != nil {
				m.record(ctx, "container.remove", c.uuid, name, err, "stage "+st.Name())
				return fmt.Errorf("container %s: remove %s: %w", name, st.Name(), err)
			}
		}
	}
	// Rename out of the way first so a crash cannot leave half a container.
	trash, err := os.MkdirTemp(m.o.StateDir, ".remove-")
	if err != nil {
		return err
	}
	if err := os.Rename(m.containerDir(c.uuid), filepath.Join(trash, "c")); err != nil {
		os.Remove(trash)
		return err
	}
	m.mu.Lock()
	c.removed = true
	delete(m.containers, c.uuid)
	c.reason = "removed"
	m.publishLocked(c)
	m.mu.Unlock()
	os.RemoveAll(m.runDir(c.uuid))
	return os.RemoveAll(trash)
}

// Wipe destroys a stopped container's data and, for an encrypted one, its
// key in the token first (crypto-erase); the container and its config
// stay (GyroidOS CONTAINER_WIPE). The next start begins with empty data.
func (m *Manager) Wipe(ctx context.Context, ref string, secret []byte) (*cmlv1.Container, error) {
	c, err := m.acquire(ref)
	if err != nil {
		return nil, err
	}
	defer c.op.Unlock()
	m.mu.Lock()
	name, cfg := c.cfg.GetName(), c.cfg
	if hasRun(c.state) {
		s := c.state
		m.mu.Unlock()
		return nil, errdefs.FailedPrecondition("container %s is %s; stop it first", name, s)
	}
	m.mu.Unlock()
	if err := m.record(ctx, "container.wipe", c.uuid, name, nil, "started"); err != nil {
		return nil, err
	}
	dir := m.containerDir(c.uuid)
	rm := Removal{ID: c.uuid, Name: name, Dir: dir, Config: cfg, Secret: secret}
	for _, st := range m.o.Stages {
		if r, ok := st.(Remover); ok {
			if err := r.Remove(ctx, rm); err != nil {
				m.record(ctx, "container.wipe", c.uuid, name, err, "stage "+st.Name())
				return nil, fmt.Errorf("container %s: wipe %s: %w", name, st.Name(), err)
			}
		}
	}
	for _, d := range []string{"data", "volumes"} {
		if err := os.RemoveAll(filepath.Join(dir, d)); err != nil {
			return nil, err
		}
	}
	m.record(ctx, "container.wipe", c.uuid, name, nil, "data destroyed")
	return m.State(c.uuid)
}

// StopAll stops every container that runs (the audit trail's full
// action, say), each with its own stop timeout, all at once.
func (m *Manager) StopAll(ctx context.Context) {
	var wg sync.WaitGroup
	for _, c := range m.List() {
		switch c.GetState() {
		case cmlv1.ContainerState_STOPPED, cmlv1.ContainerState_FAILED:
			continue
		}
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			m.Stop(ctx, id, 0)
		}(c.GetUuid())
	}
	wg.Wait()
}

// Attribute names the container a host process belongs to: by its cgroup
// (/proc/<pid>/cgroup names the container's), else by its uid's range.
func (m *Manager) Attribute(pid, uid int) (name, id string, ok bool) {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)); err == nil {
		marker := "/" + m.o.CgroupParent + "/"
		for _, l := range strings.Split(string(b), "\n") {
			if i := strings.Index(l, marker); i >= 0 {
				cand := strings.SplitN(l[i+len(marker):], "/", 2)[0]
				m.mu.Lock()
				c := m.containers[cand]
				if c != nil {
					name, id, ok = c.cfg.GetName(), c.uuid, true
				}
				m.mu.Unlock()
				return // a container of ours, or of another daemon's
			}
		}
		return "", "", false // a host process
	}
	// The process is gone: its uid's range names the container.
	if uid < int(m.o.IDBase) || m.o.IDCount == 0 {
		return "", "", false
	}
	slot := uint32((uid - int(m.o.IDBase)) / int(m.o.IDCount))
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.containers {
		if c.slot == slot && c.cfg.GetUserns() {
			return c.cfg.GetName(), c.uuid, true
		}
	}
	return "", "", false
}

// Alert pushes a security alert (the JSON of its audit record) to every
// event subscriber.
func (m *Manager) Alert(record string) {
	m.events.publish(&cmlv1.Event{TimeUnixNano: proto.Int64(m.o.Now().UnixNano()), Alert: proto.String(record)})
}

// Annotate sets a running container's state reason (an integrity failure
// its storage reported, say) and publishes it.
func (m *Manager) Annotate(id, reason string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.containers[id]; c != nil && c.run != nil {
		c.reason = reason
		m.publishLocked(c)
	}
}

// ContainerDir is a container's persistent state directory, with its id
// and config (for stages' operations outside a start).
func (m *Manager) ContainerDir(ref string) (id, name, dir string, cfg *cmlv1.ContainerConfig, running bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, err := m.lookupLocked(ref)
	if err != nil {
		return "", "", "", nil, false, err
	}
	return c.uuid, c.cfg.GetName(), m.containerDir(c.uuid), c.cfg, hasRun(c.state), nil
}

// Subscribe returns a channel of state changes; call the returned function
// to stop. The channel is closed when the subscriber falls too far behind.
func (m *Manager) Subscribe() (<-chan *cmlv1.Event, func()) {
	ch := m.events.subscribe()
	return ch, func() { m.events.unsubscribe(ch) }
}

// Logs writes the container's buffered console output to w and, with
// follow, keeps writing new output until ctx ends.
func (m *Manager) Logs(ctx context.Context, ref string, follow bool, w func([]byte) error) error {
	c, err := m.lookup(ref)
	if err != nil {
		return err
	}
	var off int64
	for {
		b, next, wake := c.console.snapshot(off)
		off = next
		if len(b) > 0 {
			if err := w(b); err != nil {
				return err
			}
		}
		if !follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		}
	}
}

// GuestOSUsers lists containers whose config selects guest OS name at
// version, or that run it. The store is asked before the manager lock is
// taken: the store may be busy (an install), and the manager lock must not
// wait for it.
func (m *Manager) GuestOSUsers(name string, version uint64) []string {
	highest, _ := m.o.GuestOS.Get(name, 0)
	m.mu.Lock()
	defer m.mu.Unlock()
	var users []string
	for _, c := range m.containers {
		if c.cfg.GetGuestOs() != name {
			continue
		}
		pinned := c.cfg.GetGuestosVersion()
		switch {
		case c.run != nil && c.version == version,
			pinned == version,
			pinned == 0 && highest != nil && highest.Version() == version:
			users = append(users, c.cfg.GetName())
		}
	}
	sort.Strings(users)
	return users
}

// record writes an audit event about container id (named name). The
// subject is the caller in ctx, when a request caused the event. Its error
// is returned so that an operation that must be audited can fail closed.
func (m *Manager) record(ctx context.Context, op, id, name string, err error, reason string) error {
	return m.recordEvent(ctx, audit.Event{Type: "container", Operation: op, Subject: audit.SubjectFrom(ctx), Object: name + "/" + id, Outcome: audit.Success, Reason: reason}, err)
}

func (m *Manager) recordEvent(ctx context.Context, e audit.Event, err error) error {
	op := e.Operation
	if err != nil {
		e.Outcome = audit.Failure
		e.Reason = err.Error()
	}
	if rerr := m.o.Audit.Record(ctx, e); rerr != nil {
		m.o.Log.Error("audit record failed", "operation", op, "err", rerr)
		return errdefs.Wrap(errdefs.ErrUnavailable, rerr, "audit trail")
	}
	return nil
}
