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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/seccomp"
	"github.com/cmlproject/cml/internal/tpm"
)

// run is the runtime state of one started container.
type run struct {
	pid      int
	process  specs.Process // template for exec: caps, env
	devices  []string      // exclusively held device keys
	measured *tpm.Event    // what was measured into the TPM for this run
	exited   chan struct{} // closed when init has exited
	done     chan struct{} // closed when everything is released
	stopping bool
}

// verityName names a container's dm-verity mapping (/dev/mapper/<name>).
func verityName(id string) string { return "cml-" + id }

// defaultPath is the PATH of container processes unless the config sets one.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Start starts a stopped container and returns once its init runs.
func (m *Manager) Start(ctx context.Context, ref string) (*cmlv1.Container, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	m.mu.Lock()
	if c.state != cmlv1.ContainerState_STOPPED && c.state != cmlv1.ContainerState_FAILED {
		s := c.state
		m.mu.Unlock()
		return nil, errdefs.FailedPrecondition("container %s is %s", c.cfg.GetName(), s)
	}
	m.setState(c, cmlv1.ContainerState_STARTING, "")
	cfg := c.cfg
	m.mu.Unlock()

	r, err := m.start(ctx, c, cfg)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		m.setState(c, cmlv1.ContainerState_FAILED, err.Error())
		return nil, err
	}
	c.run = r
	c.pid = r.pid
	c.exit = -1
	c.started = m.o.Now()
	m.setState(c, cmlv1.ContainerState_RUNNING, "")
	return m.info(c), nil
}

// deviceKey identifies a device for exclusive assignment.
func deviceKey(d config.DeviceRule) string { return fmt.Sprintf("%s %d:%d", d.Type, d.Major, d.Minor) }

// reserveDevices takes the container's assign_dev devices, refusing any that
// another running container holds (TSF-DEV: exclusive means one at most).
func (m *Manager) reserveDevices(c *Container, cfg *cmlv1.ContainerConfig) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var keys []string
	for _, r := range cfg.GetAssignDev() {
		d, _ := config.ParseDeviceRule(r)
		k := deviceKey(d)
		if holder, ok := m.devices[k]; ok && holder != c.uuid {
			name := holder
			if h := m.containers[holder]; h != nil {
				name = h.cfg.GetName()
			}
			for _, k := range keys {
				delete(m.devices, k)
			}
			return nil, errdefs.FailedPrecondition("device %s is assigned to running container %s", k, name)
		}
		m.devices[k] = c.uuid
		keys = append(keys, k)
	}
	return keys, nil
}

func (m *Manager) releaseDevices(keys []string) {
	m.mu.Lock()
	for _, k := range keys {
		delete(m.devices, k)
	}
	m.mu.Unlock()
}

func (m *Manager) start(ctx context.Context, c *Container, cfg *cmlv1.ContainerConfig) (_ *run, err error) {
	name := cfg.GetName()
	g, err := m.o.GuestOS.Get(cfg.GetGuestOs(), cfg.GetGuestosVersion())
	if err != nil {
		return nil, err
	}
	root := g.Root()
	// TSF-INIT: config and image are verified again before every start.
	// The image is checked in full (verity root over every block) and the
	// very file that was checked is mounted, through its open descriptor.
	cfgText, err := m.recheckConfig(c)
	if err != nil {
		m.record(ctx, "container.verify", c, err, "")
		return nil, err
	}
	var img string
	if m.o.GuestOS.UsesDMVerity() {
		// Blocks are checked by the kernel as they are read.
		if img, err = m.o.GuestOS.OpenVerity(ctx, g, verityName(c.uuid)); err != nil {
			m.record(ctx, "container.verify", c, err, "")
			return nil, err
		}
		defer func() {
			if err != nil {
				guestos.CloseVerity(verityName(c.uuid))
			}
		}()
	} else {
		imgFile, err := m.o.GuestOS.Check(ctx, g)
		if err != nil {
			m.record(ctx, "container.verify", c, err, "")
			return nil, err
		}
		defer imgFile.Close()
		img = fmt.Sprintf("/proc/self/fd/%d", imgFile.Fd())
	}
	m.mu.Lock()
	c.gtrust = g.Installed.Level
	m.mu.Unlock()
	keys, err := m.reserveDevices(c, cfg)
	if err != nil {
		return nil, err
	}
	rdir := m.runDir(c.uuid)
	defer func() {
		if err != nil {
			m.o.Runtime.Delete(context.WithoutCancel(ctx), c.uuid, true)
			rootfs.Unmount(rdir)
			m.releaseDevices(keys)
		}
	}()
	// Clear anything a previous run left (the recovery sweep normally has).
	m.o.Runtime.Delete(ctx, c.uuid, true)
	rootfs.Unmount(rdir)
	os.RemoveAll(rdir)

	req := rootfs.Request{Image: img, FSType: root.GetFsType(), DataDir: filepath.Join(m.containerDir(c.uuid), "data"), ReadOnly: cfg.GetReadonlyRootfs()}
	if cfg.GetUserns() {
		req.UIDBase, req.IDCount = m.uidBase(c), m.o.IDCount
	}
	rfs, err := rootfs.Mount(rdir, req)
	if err != nil {
		return nil, fmt.Errorf("container %s: root filesystem: %w", name, err)
	}
	so, err := m.specOptions(c, cfg, g.Config, rfs)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", name, err)
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
	// Measured boot of the container: what is about to run goes into the
	// TPM first; a start that cannot be measured does not happen.
	ev := measurement(c.uuid, cfg, g, cfgText)
	if m.o.Measurer != nil {
		if err := m.o.Measurer.Measure(ev); err != nil {
			reader.Close()
			m.record(ctx, "container.measure", c, err, "")
			return nil, fmt.Errorf("container %s: measure into the TPM: %w", name, err)
		}
	}
	pidFile := filepath.Join(rdir, "init.pid")
	if err := m.o.Runtime.Run(ctx, c.uuid, bundle, pidFile, rw); err != nil {
		reader.Close()
		return nil, fmt.Errorf("container %s: %w", name, err)
	}
	pid, err := readPid(pidFile)
	if err != nil {
		reader.Close()
		return nil, err
	}
	r := &run{pid: pid, process: *spec.Process, devices: keys, measured: &ev, exited: make(chan struct{}), done: make(chan struct{})}
	c.version = g.Version()
	// What a restarted daemon needs to re-adopt this run.
	rb, _ := json.Marshal(runRecord{GuestOSVersion: g.Version(), Devices: keys, Measured: &ev})
	if err := atomicfile.Write(filepath.Join(rdir, "run.json"), rb, 0o600); err != nil {
		m.o.Runtime.Kill(ctx, c.uuid, unix.SIGKILL, true)
		reader.Close()
		return nil, err
	}
	m.watch(c, r, reader)
	m.record(ctx, "container.run", c, nil, fmt.Sprintf("init pid %d, guestos %s %d", pid, g.Name(), g.Version()))
	return r, nil
}

// measurement is the TPM event for a start of c: the guest OS version and
// its root image's verity root hash (pinned by the signed manifest) and
// the digest of the exact config bytes that were just verified.
func measurement(uuid string, cfg *cmlv1.ContainerConfig, g *guestos.GuestOS, cfgText []byte) tpm.Event {
	sum := sha256.Sum256(cfgText)
	return tpm.Event{Container: uuid, Name: cfg.GetName(), GuestOS: g.Name(), Version: g.Version(),
		VerityRoot: g.Root().GetVerityRootHash(), ConfigSHA256: hex.EncodeToString(sum[:])}
}

// MeasureRunning measures every running container again. The daemon calls
// it when the TPM's PCRs were reset under running containers (cmld's own
// swtpm restarted), so an attestation still shows what runs.
func (m *Manager) MeasureRunning(ctx context.Context) error {
	if m.o.Measurer == nil {
		return nil
	}
	m.mu.Lock()
	var evs []tpm.Event
	for _, c := range m.containers {
		if c.run != nil && c.run.measured != nil {
			evs = append(evs, *c.run.measured)
		}
	}
	m.mu.Unlock()
	for _, e := range evs {
		if err := m.o.Measurer.Measure(e); err != nil {
			return fmt.Errorf("re-measure container %s: %w", e.Name, err)
		}
	}
	return nil
}

func readPid(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("init pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("init pid file %s is malformed", path)
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

func (m *Manager) specOptions(c *Container, cfg *cmlv1.ContainerConfig, g *cmlv1.GuestOSConfig, rfs string) (oci.SpecOptions, error) {
	env := []string{defaultPath, "container=cml", "CML_CONTAINER_NAME=" + cfg.GetName(), "CML_CONTAINER_UUID=" + c.uuid}
	env = append(env, g.GetInitEnv()...)
	env = append(env, cfg.GetInitEnv()...)
	so := oci.SpecOptions{
		Hostname:       cfg.GetName(),
		Rootfs:         rfs,
		ReadonlyRootfs: cfg.GetReadonlyRootfs(),
		Args:           append([]string{g.GetInitPath()}, g.GetInitParam()...),
		Env:            env,
		NetNS:          cfg.GetNetns(),
		PidsLimit:      config.DefaultPidsLimit,
		CPUs:           cfg.GetAssignCpus(),
		CPUWeight:      cfg.GetCpuWeight(),
		CPUQuotaPct:    cfg.GetCpuQuotaPercent(),
		Capabilities:   capabilities(cfg),
		CgroupsPath:    "/" + m.o.CgroupParent + "/" + c.uuid,
	}
	if cfg.GetUserns() {
		so.UIDBase, so.IDCount = m.uidBase(c), m.o.IDCount
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
		src := filepath.Join(m.containerDir(c.uuid), "volumes", v.GetName())
		if err := os.MkdirAll(src, 0o755); err != nil {
			return so, fmt.Errorf("volume %s: %w", v.GetName(), err)
		}
		if cfg.GetUserns() {
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
// and when init exits it releases everything and marks the container
// stopped. Exit is noticed at once: by wait4 when the daemon is the init's
// subreaper, by a pidfd otherwise (a re-adopted container).
func (m *Manager) watch(c *Container, r *run, console *os.File) {
	consoleDone := make(chan struct{})
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		defer close(consoleDone)
		defer console.Close()
		buf := make([]byte, 32<<10)
		for {
			n, err := console.Read(buf)
			if n > 0 {
				c.console.Write(buf[:n])
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer m.wg.Done()
		status := waitExit(r.pid)
		close(r.exited)
		select {
		case <-consoleDone:
		case <-time.After(time.Second):
			console.SetReadDeadline(time.Now())
		}
		ctx := context.Background()
		err := m.release(ctx, c, r)
		m.mu.Lock()
		stopping := r.stopping
		c.run = nil
		c.pid = 0
		c.exit = int32(status)
		reason := exitReason(status)
		if stopping {
			reason = "stopped; " + reason
		}
		if err != nil {
			m.setState(c, cmlv1.ContainerState_FAILED, "release after exit: "+err.Error())
		} else {
			m.setState(c, cmlv1.ContainerState_STOPPED, reason)
		}
		m.mu.Unlock()
		m.record(ctx, "container.exit", c, err, reason)
		close(r.done)
	}()
}

func exitReason(status int) string {
	switch {
	case status < 0:
		return "init exited (status unknown: adopted after a daemon restart)"
	case status > 128:
		return fmt.Sprintf("init killed by signal %d", status-128)
	default:
		return fmt.Sprintf("init exited with status %d", status)
	}
}

// waitExit blocks until pid exits and returns its status (code, 128+signal)
// or -1 when the process is not the daemon's child.
func waitExit(pid int) int {
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, 0, nil)
		if err == nil {
			if ws.Signaled() {
				return 128 + int(ws.Signal())
			}
			return ws.ExitStatus()
		}
		if err == unix.EINTR {
			continue
		}
		break
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1 // already gone
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != unix.EINTR {
			return -1
		}
	}
}

// release deletes the runtime state, unmounts the root filesystem and frees
// assigned devices.
func (m *Manager) release(ctx context.Context, c *Container, r *run) error {
	var errs []error
	if err := m.o.Runtime.Delete(ctx, c.uuid, true); err != nil {
		errs = append(errs, err)
	}
	rdir := m.runDir(c.uuid)
	if err := rootfs.Unmount(rdir); err != nil {
		errs = append(errs, err)
	} else {
		os.RemoveAll(rdir)
	}
	guestos.CloseVerity(verityName(c.uuid))
	if r != nil {
		m.releaseDevices(r.devices)
	}
	return errors.Join(errs...)
}

// Stop stops a running or frozen container: SIGTERM to init, then SIGKILL
// to every process after timeout (0 = the config's stop_timeout).
func (m *Manager) Stop(ctx context.Context, ref string, timeout time.Duration) (*cmlv1.Container, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	m.mu.Lock()
	r := c.run
	frozen := c.state == cmlv1.ContainerState_FROZEN
	if r == nil || (c.state != cmlv1.ContainerState_RUNNING && !frozen) {
		s := c.state
		m.mu.Unlock()
		return nil, errdefs.FailedPrecondition("container %s is %s", c.cfg.GetName(), s)
	}
	if timeout == 0 {
		timeout = time.Duration(c.cfg.GetStopTimeout()) * time.Second
		if timeout == 0 {
			timeout = config.DefaultStopSecs * time.Second
		}
	}
	r.stopping = true
	m.setState(c, cmlv1.ContainerState_STOPPING, "")
	m.mu.Unlock()

	if frozen {
		// A frozen init cannot handle SIGTERM.
		m.o.Runtime.Resume(ctx, c.uuid)
	}
	if err := m.o.Runtime.Kill(ctx, c.uuid, unix.SIGTERM, false); err != nil {
		m.o.Log.Warn("sigterm failed", "container", c.uuid, "err", err)
	}
	select {
	case <-r.exited:
	case <-time.After(timeout):
		m.o.Runtime.Kill(context.WithoutCancel(ctx), c.uuid, unix.SIGKILL, true)
		unix.Kill(r.pid, unix.SIGKILL)
	}
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		return nil, errdefs.FailedPrecondition("container %s did not stop", c.cfg.GetName())
	}
	return m.State(c.uuid)
}

// Kill sends a signal to the container's init.
func (m *Manager) Kill(ctx context.Context, ref string, sig syscall.Signal) error {
	c, err := m.lookup(ref)
	if err != nil {
		return err
	}
	m.mu.Lock()
	running := c.run != nil
	m.mu.Unlock()
	if !running {
		return errdefs.FailedPrecondition("container %s is not running", c.cfg.GetName())
	}
	if sig <= 0 || sig > 64 {
		return errdefs.InvalidArgument("signal %d is out of range 1..64", sig)
	}
	return m.o.Runtime.Kill(ctx, c.uuid, sig, false)
}

// Freeze freezes every process of a running container.
func (m *Manager) Freeze(ctx context.Context, ref string) (*cmlv1.Container, error) {
	return m.freezeOp(ctx, ref, cmlv1.ContainerState_RUNNING, cmlv1.ContainerState_FREEZING, cmlv1.ContainerState_FROZEN, m.o.Runtime.Pause)
}

// Unfreeze thaws a frozen container.
func (m *Manager) Unfreeze(ctx context.Context, ref string) (*cmlv1.Container, error) {
	return m.freezeOp(ctx, ref, cmlv1.ContainerState_FROZEN, cmlv1.ContainerState_FROZEN, cmlv1.ContainerState_RUNNING, m.o.Runtime.Resume)
}

func (m *Manager) freezeOp(ctx context.Context, ref string, from, via, to cmlv1.ContainerState, op func(context.Context, string) error) (*cmlv1.Container, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	m.mu.Lock()
	if c.state != from || c.run == nil {
		s := c.state
		m.mu.Unlock()
		return nil, errdefs.FailedPrecondition("container %s is %s, not %s", c.cfg.GetName(), s, from)
	}
	m.setState(c, via, "")
	m.mu.Unlock()
	if err := op(ctx, c.uuid); err != nil {
		m.transition(c, from, "")
		return nil, err
	}
	m.transition(c, to, "")
	return m.State(c.uuid)
}

// ExecOptions describe a process to run in a container.
type ExecOptions struct {
	Args []string
	Env  []string
	IO   oci.ExecIO
}

// Exec runs a process in a running container with the same capabilities,
// seccomp profile and no_new_privileges as its init, and returns its exit
// status.
func (m *Manager) Exec(ctx context.Context, ref string, o ExecOptions) (int, error) {
	c, err := m.lookup(ref)
	if err != nil {
		return -1, err
	}
	if len(o.Args) == 0 {
		return -1, errdefs.InvalidArgument("exec needs a command")
	}
	for _, e := range o.Env {
		if !strings.Contains(e, "=") || strings.ContainsRune(e, 0) {
			return -1, errdefs.InvalidArgument("environment entry %q is not KEY=value", e)
		}
	}
	m.mu.Lock()
	if c.state != cmlv1.ContainerState_RUNNING || c.run == nil {
		s := c.state
		m.mu.Unlock()
		return -1, errdefs.FailedPrecondition("container %s is %s, not RUNNING", c.cfg.GetName(), s)
	}
	p := c.run.process
	m.mu.Unlock()
	p.Args = o.Args
	p.Env = append(append([]string(nil), p.Env...), o.Env...)
	p.Terminal = o.IO.TTY
	return m.o.Runtime.Exec(ctx, c.uuid, &p, m.runDir(c.uuid), o.IO)
}
