package container

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/cmlproject/cml/internal/tpm"
	"os"
	"path/filepath"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/rootfs"
)

// runRecord is written next to a running container's bundle so that a
// restarted daemon can re-adopt it.
type runRecord struct {
	GuestOSVersion uint64     `json:"guestos_version"`
	Devices        []string   `json:"devices"`
	Measured       *tpm.Event `json:"measured,omitempty"`
}

// Recover loads all containers and reconciles them with what survived a
// daemon crash: containers whose init still runs are re-adopted (the
// documented policy: a daemon restart does not disturb running services);
// everything else a previous run left behind (runtime state, mounts, loop
// devices, cgroups, bundles) is released.
func (m *Manager) Recover(ctx context.Context) error {
	m.mu.Lock()
	err := m.load()
	m.mu.Unlock()
	if err != nil {
		return err
	}
	states, err := m.o.Runtime.List(ctx)
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	alive := map[string]bool{}
	for _, st := range states {
		c := m.containers[st.ID]
		if c != nil && (st.Status == "running" || st.Status == "paused") {
			if err := m.adopt(ctx, c, st.Pid, st.Status == "paused"); err == nil {
				alive[st.ID] = true
				continue
			} else {
				m.o.Log.Warn("cannot re-adopt container; stopping it", "container", st.ID, "err", err)
			}
		}
		if err := m.o.Runtime.Delete(ctx, st.ID, true); err != nil {
			m.o.Log.Warn("delete stale runtime state", "container", st.ID, "err", err)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(m.o.RunDir, "containers"))
	for _, e := range ents {
		if alive[e.Name()] {
			continue
		}
		dir := filepath.Join(m.o.RunDir, "containers", e.Name())
		if err := rootfs.Unmount(dir); err != nil {
			return fmt.Errorf("recover: %w", err)
		}
		os.RemoveAll(dir)
		guestos.CloseVerity(verityName(e.Name()))
	}
	m.sweepCgroups(alive)
	m.o.Audit.Record(ctx, audit.Event{Type: "daemon", Operation: "daemon.recover", Outcome: audit.Success,
		Reason: fmt.Sprintf("%d containers loaded, %d re-adopted", len(m.containers), len(alive))})
	return nil
}

// adopt takes over a container whose init survived a daemon restart.
func (m *Manager) adopt(ctx context.Context, c *Container, pid int, paused bool) error {
	rdir := m.runDir(c.uuid)
	var rec runRecord
	b, err := os.ReadFile(filepath.Join(rdir, "run.json"))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return err
	}
	var spec specs.Spec
	sb, err := os.ReadFile(filepath.Join(rdir, "bundle", "config.json"))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(sb, &spec); err != nil || spec.Process == nil {
		return fmt.Errorf("bundle config.json is unreadable")
	}
	reader, err := os.OpenFile(filepath.Join(rdir, "console"), os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	if err := unix.Kill(pid, 0); err != nil {
		reader.Close()
		return fmt.Errorf("init %d: %w", pid, err)
	}
	r := &run{pid: pid, process: *spec.Process, devices: rec.Devices, measured: rec.Measured, exited: make(chan struct{}), done: make(chan struct{})}
	m.mu.Lock()
	for _, k := range rec.Devices {
		m.devices[k] = c.uuid
	}
	c.run, c.pid, c.version, c.exit = r, pid, rec.GuestOSVersion, -1
	c.started = m.o.Now()
	if st, err := os.Stat(filepath.Join("/proc", fmt.Sprint(pid))); err == nil {
		c.started = st.ModTime()
	}
	state := cmlv1.ContainerState_RUNNING
	if paused {
		state = cmlv1.ContainerState_FROZEN
	}
	m.setState(c, state, "re-adopted after daemon restart")
	m.mu.Unlock()
	m.watch(c, r, reader)
	m.record(ctx, "container.adopt", c, nil, fmt.Sprintf("init pid %d", pid))
	return nil
}

// sweepCgroups removes cgroups of containers that no longer run. rmdir on
// a cgroup fails while it has tasks, so a live one cannot be removed.
func (m *Manager) sweepCgroups(alive map[string]bool) {
	var parents []string
	if v2, _ := filepath.Glob("/sys/fs/cgroup/" + m.o.CgroupParent); len(v2) > 0 {
		parents = append(parents, v2...)
	}
	v1, _ := filepath.Glob("/sys/fs/cgroup/*/" + m.o.CgroupParent)
	parents = append(parents, v1...)
	for _, p := range parents {
		ents, _ := os.ReadDir(p)
		for _, e := range ents {
			if e.IsDir() && !alive[e.Name()] {
				if _, ok := m.containers[e.Name()]; ok || len(e.Name()) == 36 {
					os.Remove(filepath.Join(p, e.Name()))
				}
			}
		}
	}
}

// Autostart starts every stopped container whose config allows it.
func (m *Manager) Autostart(ctx context.Context) {
	m.mu.Lock()
	var ids []string
	for id, c := range m.containers {
		if c.cfg.GetAllowAutostart() && c.run == nil {
			ids = append(ids, id)
		}
	}
	m.mu.Unlock()
	for _, id := range ids {
		_, err := m.Start(ctx, id)
		if err != nil {
			m.o.Log.Error("autostart failed", "container", id, "err", err)
		}
		m.mu.Lock()
		c := m.containers[id]
		m.mu.Unlock()
		if c != nil {
			m.record(ctx, "container.autostart", c, err, "")
		}
	}
}
