package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/seccomp"
)

// run is the runtime state of one started container.
type run struct {
	gen     uint64
	pid     int
	since   time.Time     // when its pid was learned
	process specs.Process // template for exec: caps, env
	records map[string]json.RawMessage
	exited  chan struct{} // closed when init has exited
	done    chan struct{} // closed when everything is released
}

// runRecord is written to the run directory before the runtime runs the
// container: what a restarted daemon needs to re-adopt the run, or to
// release it (each stage's record).
type runRecord struct {
	Gen            uint64                     `json:"gen"`
	GuestOSVersion uint64                     `json:"guestos_version"`
	Stages         map[string]json.RawMessage `json:"stages"`
	// Timings are how long each stage and the runtime took (debugging,
	// make bench).
	Timings []Timing `json:"timings"`
}

// defaultPath is the PATH of container processes unless the config sets one.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// StartOptions are per-start inputs from the client.
type StartOptions struct {
	// Secret unlocks the container's storage (a PIN); never logged.
	Secret []byte
}

// Start starts a stopped container and returns once its init runs.
func (m *Manager) Start(ctx context.Context, ref string, so StartOptions) (*cmlv1.Container, error) {
	c, err := m.acquire(ref)
	if err != nil {
		return nil, err
	}
	defer c.op.Unlock()
	m.mu.Lock()
	if !allowed(c.state, Starting) {
		s, name := c.state, c.cfg.GetName()
		m.mu.Unlock()
		return nil, errdefs.FailedPrecondition("container %s is %s", name, s)
	}
	c.gen++
	gen := c.gen
	m.updateLocked(c, gen, Starting, "")
	s := &Start{ID: c.uuid, Name: c.cfg.GetName(), Config: c.cfg, Dir: m.containerDir(c.uuid), RunDir: m.runDir(c.uuid),
		Accepted: c.accepted, Trust: c.trust, Secret: so.Secret, Slot: c.slot}
	if c.cfg.GetUserns() {
		s.UIDBase, s.IDCount = m.uidBase(c.slot), m.o.IDCount
	}
	m.mu.Unlock()

	if _, err := m.start(ctx, c, gen, s); err != nil {
		m.update(c, gen, Failed, err.Error())
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// Init may already have exited (and the watcher recorded it): then
	// the update is refused and the caller sees the container stopped.
	m.updateLocked(c, gen, Running, "")
	return m.info(c), nil
}

func (m *Manager) start(ctx context.Context, c *Container, gen uint64, s *Start) (_ *run, err error) {
	defer s.finish()
	rdir := s.RunDir
	m.mu.Lock()
	dirty := c.dirty
	m.mu.Unlock()
	if dirty {
		// The last run's release failed: clear what it left first. (A
		// clean previous run was released by its exit watcher, and
		// recovery sweeps after a daemon restart, so the common start
		// pays for no runtime call here.)
		if err := m.release(ctx, c.uuid, nil); err != nil {
			return nil, fmt.Errorf("container %s: clear previous run: %w", s.Name, err)
		}
		m.mu.Lock()
		c.dirty = false
		m.mu.Unlock()
	}
	os.RemoveAll(rdir)
	if err := os.Mkdir(rdir, 0o700); err != nil {
		return nil, err
	}
	// Only root and this container's id range may enter its run
	// directory (root filesystem, console, bundle).
	if err := rootfs.Private(rdir, s.UIDBase, s.IDCount); err != nil {
		return nil, err
	}
	records, timings, err := m.prepare(ctx, s)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", s.Name, err)
	}
	runStarted := false
	defer func() {
		if err != nil {
			bg := context.WithoutCancel(ctx)
			var rerr error
			if runStarted {
				rerr = m.o.Runtime.Delete(bg, c.uuid, true)
			}
			if err := m.releaseStages(bg, c.uuid, m.o.Stages, records); err != nil || rerr != nil {
				m.o.Log.Warn("release after a failed start", "container", s.Name, "err", errors.Join(rerr, err))
				m.mu.Lock()
				c.dirty = true
				m.mu.Unlock()
			}
			os.RemoveAll(rdir)
		}
	}()
	m.mu.Lock()
	c.gtrust = s.GuestOS.Installed.Level
	m.mu.Unlock()

	t0 := time.Now()
	so, err := m.specOptions(c, s)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", s.Name, err)
	}
	spec := oci.Spec(so)
	bundle := filepath.Join(rdir, "bundle")
	if err := oci.WriteBundle(bundle, spec); err != nil {
		return nil, err
	}
	// The console is a FIFO the container holds open read-write, so its
	// output never hits a closed pipe while the daemon restarts; the daemon
	// reads it through its own non-blocking read end.
	fifo := filepath.Join(rdir, "console")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		return nil, fmt.Errorf("console fifo: %w", err)
	}
	rw, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer rw.Close()
	reader, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			reader.Close()
		}
	}()
	timings = append(timings, Timing{Stage: "bundle", Took: time.Since(t0)})
	// Written ahead of the runtime: a daemon that dies from here on finds
	// what to re-adopt or release. The run directory is per boot (tmpfs),
	// so it needs no fsync.
	rec := runRecord{Gen: gen, GuestOSVersion: s.GuestOS.Version(), Stages: records, Timings: timings}
	if err := writeRunRecord(rdir, rec); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("container %s: %w", s.Name, err)
	}
	t0 = time.Now()
	runStarted = true
	pidFile := filepath.Join(rdir, "init.pid")
	if err := m.o.Runtime.Run(ctx, c.uuid, bundle, pidFile, rw); err != nil {
		return nil, fmt.Errorf("container %s: %w", s.Name, err)
	}
	pid, err := readPid(pidFile)
	if err != nil {
		return nil, err
	}
	rec.Timings = append(rec.Timings, Timing{Stage: "runtime", Took: time.Since(t0)})
	writeRunRecord(rdir, rec)
	m.o.Log.Debug("container started", "container", s.Name, "pid", pid, "timings", rec.Timings)
	// since is when the runtime began: an init that died (and was reaped)
	// before runc returned still has its status claimed.
	r := &run{gen: gen, pid: pid, since: t0, process: *spec.Process, records: records, exited: make(chan struct{}), done: make(chan struct{})}
	// A start that cannot be audited does not stay running.
	if err := m.record(ctx, "container.run", c.uuid, s.Name, nil, fmt.Sprintf("init pid %d, guestos %s %d", pid, s.GuestOS.Name(), s.GuestOS.Version())); err != nil {
		return nil, fmt.Errorf("container %s: %w", s.Name, err)
	}
	m.mu.Lock()
	c.run, c.version, c.started = r, s.GuestOS.Version(), m.o.Now()
	m.mu.Unlock()
	m.watch(c, r, reader)
	return r, nil
}

func writeRunRecord(dir string, rec runRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "run.json"), b, 0o600)
}

func readRunRecord(dir string) (runRecord, error) {
	var rec runRecord
	b, err := os.ReadFile(filepath.Join(dir, "run.json"))
	if err != nil {
		return rec, err
	}
	return rec, json.Unmarshal(b, &rec)
}

// RunTimings returns how long each stage of container ref's current run
// took, from its run record.
func (m *Manager) RunTimings(ref string) ([]Timing, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	rec, err := readRunRecord(m.runDir(c.uuid))
	return rec.Timings, err
}

func readPid(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("init pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("init pid file %s is malformed", filepath.Base(path))
	}
	return pid, nil
}

// capabilities returns the capability set for cfg.
func capabilities(cfg *cmlv1.ContainerConfig) []string {
	caps := append([]string(nil), oci.DefaultCapabilities...)
	have := map[string]bool{}
	for _, cp := range caps {
		have[cp] = true
	}
	extra := cfg.GetCapabilitiesKeep()
	if cfg.GetAllowSystemTime() {
		extra = append(extra, "CAP_SYS_TIME")
	}
	for _, cp := range extra {
		if !have[cp] {
			caps = append(caps, cp)
			have[cp] = true
		}
	}
	return caps
}

func (m *Manager) specOptions(c *Container, s *Start) (oci.SpecOptions, error) {
	cfg, g := s.Config, s.GuestOS.Config
	env := []string{defaultPath, "container=cml", "CML_CONTAINER_NAME=" + cfg.GetName(), "CML_CONTAINER_UUID=" + c.uuid}
	env = append(env, g.GetInitEnv()...)
	env = append(env, cfg.GetInitEnv()...)
	so := oci.SpecOptions{
		Hostname:       cfg.GetName(),
		Rootfs:         s.Rootfs,
		ReadonlyRootfs: cfg.GetReadonlyRootfs(),
		Args:           append([]string{g.GetInitPath()}, g.GetInitParam()...),
		Env:            env,
		NetNS:          cfg.GetNetns(),
		NetNSPath:      s.NetNSPath,
		PidsLimit:      config.DefaultPidsLimit,
		CPUs:           cfg.GetAssignCpus(),
		CPUWeight:      cfg.GetCpuWeight(),
		CPUQuotaPct:    cfg.GetCpuQuotaPercent(),
		Capabilities:   capabilities(cfg),
		CgroupsPath:    "/" + m.o.CgroupParent + "/" + c.uuid,
		UIDBase:        s.UIDBase,
		IDCount:        s.IDCount,
		Mounts:         append([]oci.Mount(nil), s.Mounts...),
	}
	if p := cfg.GetPidsLimit(); p > 0 {
		so.PidsLimit = int64(p)
	}
	if r := cfg.GetRamLimit(); r > 0 {
		so.MemoryBytes = int64(r) << 20
		so.NoSwap = swapLimitSupported()
	}
	if cfg.GetSeccompProfile() != "unconfined" {
		so.Seccomp = seccomp.Default(seccomp.Options{AllowClock: cfg.GetAllowSystemTime()})
	}
	for _, rules := range [][]string{cfg.GetAllowDev(), cfg.GetAssignDev()} {
		for _, r := range rules {
			d, _ := config.ParseDeviceRule(r)
			dev := oci.Device{Type: d.Type, Major: d.Major, Minor: d.Minor, Access: d.Access}
			if d.Major >= 0 && d.Minor >= 0 {
				dev.Path, dev.Mode = hostDeviceNode(d)
			}
			so.Devices = append(so.Devices, dev)
		}
	}
	for _, v := range cfg.GetVolumes() {
		src := filepath.Join(s.Dir, "volumes", v.GetName())
		if s.DataDir != "" {
			src = filepath.Join(s.DataDir, "volumes", v.GetName())
		}
		if err := os.MkdirAll(src, 0o755); err != nil {
			return so, fmt.Errorf("volume %s: %w", v.GetName(), err)
		}
		if s.IDCount > 0 {
			if err := os.Chown(src, int(so.UIDBase), int(so.UIDBase)); err != nil {
				return so, fmt.Errorf("volume %s: %w", v.GetName(), err)
			}
		}
		so.Mounts = append(so.Mounts, oci.Mount{Source: src, Destination: v.GetMountPoint(), ReadOnly: v.GetReadonly()})
	}
	return so, nil
}

// swapLimitSupported reports whether the host can limit memory+swap; runc
// fails a start that asks for it where swap accounting is off. The host
// does not change under a running daemon, so it is probed once.
var swapLimitSupported = sync.OnceValue(probeSwapLimit)

func probeSwapLimit() bool {
	for _, p := range []string{"/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "/sys/fs/cgroup/cgroup.subtree_control"} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if strings.HasSuffix(p, "subtree_control") {
			// cgroup v2: swap control exists whenever memory does.
			_, err := os.Stat("/sys/fs/cgroup/memory.stat")
			return strings.Contains(string(b), "memory") || err == nil
		}
		return true
	}
	return false
}

// hostDeviceNode finds the host's /dev node for d, so the container gets a
// node at the same path; empty when the host has none.
func hostDeviceNode(d config.DeviceRule) (string, os.FileMode) {
	var found string
	var mode os.FileMode
	want := unix.Mkdev(uint32(d.Major), uint32(d.Minor))
	filepath.WalkDir("/dev", func(p string, e os.DirEntry, err error) error {
		if err != nil || found != "" {
			return filepath.SkipDir
		}
		if e.IsDir() && strings.Count(p, "/") > 3 {
			return filepath.SkipDir
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil {
			return nil
		}
		isChar := st.Mode&unix.S_IFMT == unix.S_IFCHR
		isBlock := st.Mode&unix.S_IFMT == unix.S_IFBLK
		if (isChar && d.Type == "c" || isBlock && d.Type == "b") && st.Rdev == want {
			found, mode = p, os.FileMode(st.Mode&0o777)
		}
		return nil
	})
	return found, mode
}

// watch follows a started container: it copies its console into the ring,
// and when init exits it releases everything and marks the run ended,
// through the checked update for the run's generation.
func (m *Manager) watch(c *Container, r *run, console *os.File) {
	consoleDone := make(chan struct{})
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		defer close(consoleDone)
		defer console.Close()
		buf := make([]byte, 32<<10)
		limit := newLimiter(m.o.ConsoleRate, m.o.ConsoleRate)
		for {
			n, err := console.Read(buf)
			if n > 0 {
				c.console.Write(buf[:n])
				limit.take(n)
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer m.wg.Done()
		exit := <-m.o.Exits.Wait(r.pid, r.since)
		close(r.exited)
		select {
		case <-consoleDone:
		case <-time.After(time.Second):
			console.SetReadDeadline(time.Now())
		}
		ctx := context.Background()
		err := m.release(ctx, c.uuid, r.records)
		m.mu.Lock()
		stopping := c.state == Stopping && c.gen == r.gen
		reason := "init " + exit.String()
		if stopping {
			reason = "stopped; " + reason
		}
		if c.gen == r.gen {
			c.run = nil
			c.exit, c.exited = exit, true
		}
		if err != nil {
			c.dirty = true
		}
		if err != nil {
			m.updateLocked(c, r.gen, Failed, "release after exit: "+err.Error())
		} else {
			m.updateLocked(c, r.gen, Stopped, reason)
		}
		name := c.cfg.GetName()
		m.mu.Unlock()
		e := audit.Event{Type: "container", Operation: "container.exit", Object: name + "/" + c.uuid, Outcome: audit.Success, Reason: reason}
		if exit.Known && exit.Signal != 0 {
			e.ExitSignal = int(exit.Signal)
		} else if exit.Known {
			e.ExitCode = &exit.Code
		}
		m.recordEvent(ctx, e, err)
		close(r.done)
	}()
}

// release deletes the runtime state and releases the stages in reverse.
func (m *Manager) release(ctx context.Context, id string, records map[string]json.RawMessage) error {
	var errs []error
	if err := m.o.Runtime.Delete(ctx, id, true); err != nil {
		errs = append(errs, err)
	}
	if err := m.releaseStages(ctx, id, m.o.Stages, records); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	os.RemoveAll(m.runDir(id))
	return nil
}

// running returns c's current run and generation if c is in one of the
// given states.
func (m *Manager) running(c *Container, states ...State) (*run, uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range states {
		if c.state == s && c.run != nil {
			return c.run, c.gen, nil
		}
	}
	if len(states) == 1 {
		return nil, 0, errdefs.FailedPrecondition("container %s is %s, not %s", c.cfg.GetName(), c.state, states[0])
	}
	return nil, 0, errdefs.FailedPrecondition("container %s is %s", c.cfg.GetName(), c.state)
}

// Stop stops a running or frozen container: SIGTERM to init, then SIGKILL
// to every process after timeout (0 = the config's stop_timeout).
func (m *Manager) Stop(ctx context.Context, ref string, timeout time.Duration) (*cmlv1.Container, error) {
	c, err := m.acquire(ref)
	if err != nil {
		return nil, err
	}
	defer c.op.Unlock()
	m.mu.Lock()
	r := c.run
	frozen := c.state == Frozen
	name := c.cfg.GetName()
	if r == nil || !m.updateLocked(c, r.gen, Stopping, "") {
		s := c.state
		m.mu.Unlock()
		return nil, errdefs.FailedPrecondition("container %s is %s", name, s)
	}
	if timeout == 0 {
		timeout = time.Duration(c.cfg.GetStopTimeout()) * time.Second
		if timeout == 0 {
			timeout = config.DefaultStopSecs * time.Second
		}
	}
	m.mu.Unlock()

	bg := context.WithoutCancel(ctx)
	if frozen {
		// A frozen init cannot handle SIGTERM.
		m.o.Runtime.Resume(bg, c.uuid)
	}
	if err := m.o.Runtime.Kill(bg, c.uuid, unix.SIGTERM, false); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		m.o.Log.Warn("sigterm failed", "container", c.uuid, "err", err)
	}
	select {
	case <-r.exited:
	case <-time.After(timeout):
		m.o.Runtime.Kill(bg, c.uuid, unix.SIGKILL, true)
	}
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		return nil, errdefs.FailedPrecondition("container %s did not stop", name)
	}
	return m.State(c.uuid)
}

// Kill sends a signal to the container's init.
func (m *Manager) Kill(ctx context.Context, ref string, sig syscall.Signal) error {
	if sig <= 0 || sig > 64 {
		return errdefs.InvalidArgument("signal %d is out of range 1..64", sig)
	}
	c, err := m.lookup(ref)
	if err != nil {
		return err
	}
	m.mu.Lock()
	running := c.run != nil
	name := c.cfg.GetName()
	m.mu.Unlock()
	if !running {
		return errdefs.FailedPrecondition("container %s is not running", name)
	}
	return m.o.Runtime.Kill(ctx, c.uuid, sig, false)
}

// Freeze freezes every process of a running container.
func (m *Manager) Freeze(ctx context.Context, ref string) (*cmlv1.Container, error) {
	return m.freezeOp(ctx, ref, Running, Freezing, Frozen, m.o.Runtime.Pause)
}

// Unfreeze thaws a frozen container.
func (m *Manager) Unfreeze(ctx context.Context, ref string) (*cmlv1.Container, error) {
	return m.freezeOp(ctx, ref, Frozen, Frozen, Running, m.o.Runtime.Resume)
}

// freezeOp moves a container from -> via -> to around op. Every step is a
// checked update for the run's generation: if init exits while op runs,
// the watcher's Stopped stands and the operation reports it.
func (m *Manager) freezeOp(ctx context.Context, ref string, from, via, to State, op func(context.Context, string) error) (*cmlv1.Container, error) {
	c, err := m.acquire(ref)
	if err != nil {
		return nil, err
	}
	defer c.op.Unlock()
	_, gen, err := m.running(c, from)
	if err != nil {
		return nil, err
	}
	if via != from && !m.update(c, gen, via, "") {
		return nil, m.ended(c, to)
	}
	if err := op(ctx, c.uuid); err != nil {
		m.update(c, gen, from, "")
		if ended := m.ended(c, to); ended != nil && !m.inGen(c, gen) {
			return nil, ended
		}
		return nil, fmt.Errorf("container %s: %w", ref, err)
	}
	if !m.update(c, gen, to, "") {
		return nil, m.ended(c, to)
	}
	return m.State(c.uuid)
}

// inGen reports whether c is still running generation gen.
func (m *Manager) inGen(c *Container, gen uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return c.gen == gen && c.run != nil && !c.removed
}

func (m *Manager) ended(c *Container, to State) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return errdefs.FailedPrecondition("container %s is %s, not %s: %s", c.cfg.GetName(), c.state, to, c.reason)
}

// ExecOptions describe a process to run in a container.
type ExecOptions struct {
	Args []string
	Env  []string
	IO   oci.ExecIO
	// Rows and Cols size the process's terminal from its start (with
	// IO.TTY), so nothing it runs first sees an unsized terminal.
	Rows, Cols uint
}

// Exec runs a process in a running container with the same capabilities,
// seccomp profile and no_new_privileges as its init, and returns its exit
// status.
func (m *Manager) Exec(ctx context.Context, ref string, o ExecOptions) (int, error) {
	if len(o.Args) == 0 {
		return -1, errdefs.InvalidArgument("exec needs a command")
	}
	for _, e := range o.Env {
		if !strings.Contains(e, "=") || strings.ContainsRune(e, 0) {
			return -1, errdefs.InvalidArgument("environment entry %q is not KEY=value", e)
		}
	}
	c, err := m.lookup(ref)
	if err != nil {
		return -1, err
	}
	r, _, err := m.running(c, Running)
	if err != nil {
		return -1, err
	}
	p := r.process
	p.Args = o.Args
	p.Env = append(append([]string(nil), p.Env...), o.Env...)
	p.Terminal = o.IO.TTY
	if o.IO.TTY && o.Rows > 0 && o.Cols > 0 {
		p.ConsoleSize = &specs.Box{Height: o.Rows, Width: o.Cols}
	}
	return m.o.Runtime.Exec(ctx, c.uuid, &p, m.runDir(c.uuid), o.IO)
}

// Wait waits for the watchers (tests and shutdown).
func (m *Manager) Wait() { m.wg.Wait() }
