// Package container is the container lifecycle: it creates, starts, stops,
// freezes and removes containers, keeps their configs and state on disk,
// watches their init processes, and re-adopts running containers after the
// daemon restarts.
//
// It decides everything about a container and hands the result to the OCI
// runtime driver (package oci) and the root filesystem builder (package
// rootfs); it has no namespace code of its own. It does not authorize
// callers (the API layer does) and does not verify signatures (the trust
// chain plugs in before Start mounts an image).
package container

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
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
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/tpm"
	"github.com/cmlproject/cml/internal/trust"
)

// Options configure a Manager.
type Options struct {
	// StateDir holds one directory per container: config, metadata and
	// the writable data layer. It persists across reboots.
	StateDir string
	// RunDir holds per-run state: bundles and mounts. It may be a tmpfs.
	RunDir  string
	Runtime *oci.Runtime
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
	// Trust verifies config signatures; SignedConfigs refuses unsigned
	// configs (device setting signed_configs).
	Trust         *trust.Store
	SignedConfigs bool
	// Measurer extends each start into the TPM before the runtime runs
	// it; nil measures nothing (unit tests).
	Measurer Measurer
}

// Measurer records a container start in the TPM and its event log.
type Measurer interface {
	Measure(tpm.Event) error
}

// ConfigFile is a container config as it arrived: its exact bytes, and its
// detached signature and signer chain when signed.
type ConfigFile struct {
	Source         string
	Text, Sig, Pem []byte
}

// Manager manages all containers of the daemon.
type Manager struct {
	o          Options
	mu         sync.Mutex // guards containers, devices and every container's mutable fields
	containers map[string]*Container
	devices    map[string]string // assigned device "c 4:1" -> holder uuid
	events     *broker
	wg         sync.WaitGroup
}

// Container is one managed container. Its fields are guarded by the
// Manager's mu; op serializes lifecycle operations on it.
type Container struct {
	uuid    string
	slot    uint32
	cfg     *cmlv1.ContainerConfig
	op      sync.Mutex
	state   cmlv1.ContainerState
	reason  string
	pid     int
	exit    int32
	started time.Time
	version uint64           // guest OS version of the current run
	trust   cmlv1.TrustLevel // of the config
	gtrust  cmlv1.TrustLevel // of the guest OS last checked
	signer  string
	// accepted is when the config's signature was checked; re-checks use
	// this time so only revocation or a removed CA, not expiry, stop it.
	accepted time.Time
	console  *ring
	run      *run // non-nil while the container has runtime state
}

type meta struct {
	UUID     string           `json:"uuid"`
	Slot     uint32           `json:"slot"`
	Created  time.Time        `json:"created"`
	Accepted time.Time        `json:"accepted"`
	Trust    cmlv1.TrustLevel `json:"trust"`
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
	for _, d := range []string{o.StateDir, filepath.Join(o.RunDir, "containers")} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, err
		}
	}
	return &Manager{o: o, containers: map[string]*Container{}, devices: map[string]string{}, events: newBroker()}, nil
}

func (m *Manager) containerDir(id string) string { return filepath.Join(m.o.StateDir, id) }
func (m *Manager) runDir(id string) string       { return filepath.Join(m.o.RunDir, "containers", id) }

// load reads every container from the state directory.
func (m *Manager) load() error {
	ents, err := os.ReadDir(m.o.StateDir)
	if err != nil {
		return err
	}
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
			return fmt.Errorf("container %s: %w", e.Name(), err)
		}
		m.containers[c.uuid] = c
	}
	return nil
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
	text, err := os.ReadFile(filepath.Join(dir, "config.conf"))
	if err != nil {
		return nil, err
	}
	cfg, err := config.ParseContainer(filepath.Join(dir, "config.conf"), text)
	if err != nil {
		return nil, err
	}
	c := &Container{uuid: id, slot: md.Slot, cfg: cfg, state: cmlv1.ContainerState_STOPPED, exit: -1, console: newRing(m.o.ConsoleSize),
		trust: md.Trust, signer: md.Signer, accepted: md.Accepted, gtrust: cmlv1.TrustLevel_SIGNED}
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

// info returns the API view of c; m.mu must be held.
func (m *Manager) info(c *Container) *cmlv1.Container {
	out := &cmlv1.Container{
		Uuid:       proto.String(c.uuid),
		Name:       proto.String(c.cfg.GetName()),
		State:      c.state.Enum(),
		GuestOs:    proto.String(c.cfg.GetGuestOs()),
		ExitStatus: proto.Int32(c.exit),
		Autostart:  proto.Bool(c.cfg.GetAllowAutostart()),
	}
	if c.reason != "" {
		out.Reason = proto.String(c.reason)
	}
	if c.version != 0 {
		out.GuestosVersion = proto.Uint64(c.version)
	} else if v := c.cfg.GetGuestosVersion(); v != 0 {
		out.GuestosVersion = proto.Uint64(v)
	}
	if c.pid > 0 {
		out.Pid = proto.Int32(int32(c.pid))
		out.StartedUnixNano = proto.Int64(c.started.UnixNano())
	}
	if c.cfg.GetUserns() {
		out.UidBase = proto.Uint32(m.uidBase(c))
	}
	out.TrustLevel = min(c.trust, c.gtrust).Enum()
	if c.signer != "" {
		out.ConfigSigner = proto.String(c.signer)
	}
	return out
}

func (m *Manager) uidBase(c *Container) uint32 { return m.o.IDBase + c.slot*m.o.IDCount }

// setState changes c's state and publishes the change; m.mu must be held.
func (m *Manager) setState(c *Container, s cmlv1.ContainerState, reason string) {
	c.state = s
	c.reason = reason
	m.events.publish(&cmlv1.Event{TimeUnixNano: proto.Int64(m.o.Now().UnixNano()), Container: m.info(c)})
}

func (m *Manager) transition(c *Container, s cmlv1.ContainerState, reason string) {
	m.mu.Lock()
	m.setState(c, s, reason)
	m.mu.Unlock()
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
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.info(c), nil
}

// Config returns a container's stored config.
func (m *Manager) Config(ref string) (*cmlv1.ContainerConfig, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
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
	g, err := m.o.GuestOS.Get(cfg.GetGuestOs(), cfg.GetGuestosVersion())
	if err != nil {
		return nil, err
	}
	if min := g.Config.GetMinRamLimit(); cfg.GetRamLimit() != 0 && cfg.GetRamLimit() < min {
		return nil, errdefs.InvalidArgument("%s: field ram_limit: %d MiB is under guest OS %s's minimum of %d MiB", source, cfg.GetRamLimit(), g.Name(), min)
	}
	return g, nil
}

// acceptConfig parses a config file and checks its signature: SIGNED or
// LOCALLY_SIGNED by a trusted chain, or UNSIGNED where the device allows
// unsigned configs. at is the time the signer must be valid.
func (m *Manager) acceptConfig(f ConfigFile, at time.Time) (*cmlv1.ContainerConfig, trust.Result, error) {
	if len(f.Text) > config.MaxFileSize {
		return nil, trust.Result{}, errdefs.InvalidArgument("%s: larger than %d bytes", f.Source, config.MaxFileSize)
	}
	var res trust.Result
	switch {
	case len(f.Sig) == 0 && len(f.Pem) == 0:
		if m.o.SignedConfigs {
			return nil, res, errdefs.Integrity("%s: config is not signed and this device requires signed configs (device setting signed_configs)", f.Source)
		}
		res.Level = cmlv1.TrustLevel_UNSIGNED
	case m.o.Trust == nil:
		return nil, res, errdefs.FailedPrecondition("%s: no trust store to check the signature", f.Source)
	default:
		var err error
		if res, err = m.o.Trust.Verify(f.Text, f.Sig, f.Pem, at); err != nil {
			return nil, res, fmt.Errorf("%s: %w", f.Source, err)
		}
	}
	cfg, err := config.ParseContainer(f.Source, f.Text)
	if err != nil {
		return nil, res, err
	}
	return cfg, res, nil
}

// writeConfigFiles stores the exact config bytes and their signature.
func writeConfigFiles(dir string, f ConfigFile) error {
	for name, b := range map[string][]byte{"config.conf": f.Text, "config.conf" + sign.SigSuffix: f.Sig, "config.conf" + sign.CertSuffix: f.Pem} {
		p := filepath.Join(dir, name)
		if len(b) == 0 && name != "config.conf" {
			if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
				return err
			}
			continue
		}
		if err := atomicfile.Write(p, b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// recheckConfig re-reads the stored config and verifies it again before a
// start: a revoked signer, a removed CA, an edited file or an unsigned
// config after signed_configs was turned on stop the start.
func (m *Manager) recheckConfig(c *Container) ([]byte, error) {
	dir := m.containerDir(c.uuid)
	f := ConfigFile{Source: "config of " + c.cfg.GetName()}
	var err error
	if f.Text, err = os.ReadFile(filepath.Join(dir, "config.conf")); err != nil {
		return nil, errdefs.Integrity("%s: %v", f.Source, err)
	}
	f.Sig, _ = os.ReadFile(filepath.Join(dir, "config.conf"+sign.SigSuffix))
	f.Pem, _ = os.ReadFile(filepath.Join(dir, "config.conf"+sign.CertSuffix))
	cfg, res, err := m.acceptConfig(f, c.accepted)
	if err != nil {
		return nil, err
	}
	if !proto.Equal(cfg, c.cfg) || res.Level != c.trust {
		return nil, errdefs.Integrity("%s: stored config changed since it was accepted", f.Source)
	}
	return f.Text, nil
}

// Create stores a new container from a config file.
func (m *Manager) Create(ctx context.Context, f ConfigFile) (*cmlv1.Container, error) {
	now := m.o.Now()
	cfg, res, err := m.acceptConfig(f, now)
	if err != nil {
		return nil, err
	}
	source := f.Source
	g, err := m.checkConfig(source, cfg)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.lookupLocked(cfg.GetName()); err == nil {
		return nil, errdefs.AlreadyExists("container %q already exists", cfg.GetName())
	}
	used := map[uint32]bool{}
	for _, c := range m.containers {
		used[c.slot] = true
	}
	var slot uint32
	for used[slot] {
		slot++
	}
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
	if err := writeConfigFiles(tmp, f); err != nil {
		return nil, err
	}
	mb, _ := json.Marshal(meta{UUID: id, Slot: slot, Created: now.UTC(), Accepted: now.UTC(), Trust: res.Level, Signer: res.Signer})
	if err := atomicfile.Write(filepath.Join(tmp, "meta.json"), mb, 0o600); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, m.containerDir(id)); err != nil {
		return nil, err
	}
	ok = true
	c := &Container{uuid: id, slot: slot, cfg: cfg, state: cmlv1.ContainerState_STOPPED, exit: -1, console: newRing(m.o.ConsoleSize),
		trust: res.Level, signer: res.Signer, accepted: now.UTC(), gtrust: g.Installed.Level}
	m.containers[id] = c
	m.setState(c, cmlv1.ContainerState_STOPPED, "created")
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
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	if f.Source == "" {
		f.Source = "config of " + ref
	}
	now := m.o.Now()
	cfg, res, err := m.acceptConfig(f, now)
	if err != nil {
		return nil, err
	}
	g, err := m.checkConfig(f.Source, cfg)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if other, err := m.lookupLocked(cfg.GetName()); err == nil && other != c {
		return nil, errdefs.AlreadyExists("container %q already exists", cfg.GetName())
	}
	dir := m.containerDir(c.uuid)
	mb, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return nil, err
	}
	var md meta
	if err := json.Unmarshal(mb, &md); err != nil {
		return nil, err
	}
	md.Accepted, md.Trust, md.Signer = now.UTC(), res.Level, res.Signer
	mb, _ = json.Marshal(md)
	// Config first: a crash between the two leaves the new config with the
	// old acceptance record, which the pre-start re-check then refuses
	// rather than trusts.
	if err := writeConfigFiles(dir, f); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, "meta.json"), mb, 0o600); err != nil {
		return nil, err
	}
	c.cfg = cfg
	c.trust, c.signer, c.accepted, c.gtrust = res.Level, res.Signer, now.UTC(), g.Installed.Level
	m.setState(c, c.state, c.reason)
	return m.info(c), nil
}

// Remove deletes a stopped container and all its data.
func (m *Manager) Remove(ctx context.Context, ref string) error {
	c, err := m.lookup(ref)
	if err != nil {
		return err
	}
	c.op.Lock()
	defer c.op.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if c.state != cmlv1.ContainerState_STOPPED && c.state != cmlv1.ContainerState_FAILED {
		return errdefs.FailedPrecondition("container %s is %s; stop it first", c.cfg.GetName(), c.state)
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
	delete(m.containers, c.uuid)
	os.RemoveAll(m.runDir(c.uuid))
	m.setState(c, cmlv1.ContainerState_STOPPED, "removed")
	return os.RemoveAll(trash)
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
// version, or that run it.
func (m *Manager) GuestOSUsers(name string, version uint64) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var users []string
	highest, _ := m.o.GuestOS.Get(name, 0)
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

// record writes an audit event the daemon causes itself (no subject).
func (m *Manager) record(ctx context.Context, op string, c *Container, err error, reason string) {
	e := audit.Event{Type: "container", Operation: op, Object: c.cfg.GetName() + "/" + c.uuid, Outcome: audit.Success, Reason: reason}
	if err != nil {
		e.Outcome = audit.Failure
		e.Reason = err.Error()
	}
	if rerr := m.o.Audit.Record(ctx, e); rerr != nil {
		m.o.Log.Error("audit record failed", "operation", op, "err", rerr)
	}
}
