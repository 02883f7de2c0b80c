package container

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cmlproject/cml/internal/audit"
)

// Recover loads all containers and reconciles them with what survived a
// daemon crash: containers whose init still runs are re-adopted (the
// documented policy: a daemon restart does not disturb running services);
// for everything else a previous run left behind, the runtime state is
// deleted and the stages are released from their run records.
func (m *Manager) Recover(ctx context.Context) error {
	loaded, err := m.load()
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.containers = loaded
	m.mu.Unlock()
	states, err := m.o.Runtime.List(ctx)
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	alive := map[string]bool{}
	for _, st := range states {
		c := loaded[st.ID]
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
		dir := m.runDir(e.Name())
		rec, _ := readRunRecord(dir)
		if err := m.releaseStages(ctx, e.Name(), m.o.Stages, rec.Stages); err != nil {
			return fmt.Errorf("recover: %w", err)
		}
		os.RemoveAll(dir)
	}
	m.sweepCgroups(alive, loaded)
	for _, st := range m.o.Stages {
		if sw, ok := st.(Sweeper); ok {
			if err := sw.Sweep(ctx, alive); err != nil {
				return fmt.Errorf("recover: sweep %s: %w", st.Name(), err)
			}
		}
	}
	return m.o.Audit.Record(ctx, audit.Event{Type: "daemon", Operation: "daemon.recover", Outcome: audit.Success,
		Reason: fmt.Sprintf("%d containers loaded, %d re-adopted", len(loaded), len(alive))})
}

// adopt takes over a container whose init survived a daemon restart.
func (m *Manager) adopt(ctx context.Context, c *Container, pid int, paused bool) error {
	rdir := m.runDir(c.uuid)
	rec, err := readRunRecord(rdir)
	if err != nil {
		return fmt.Errorf("run record: %w", err)
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
	for _, st := range m.o.Stages {
		if a, ok := st.(Adopter); ok {
			if err := a.Adopt(ctx, c.uuid, pid, rec.Stages[st.Name()]); err != nil {
				reader.Close()
				return fmt.Errorf("adopt %s: %w", st.Name(), err)
			}
		}
	}
	since := time.Now()
	m.mu.Lock()
	c.gen = rec.Gen
	r := &run{gen: c.gen, pid: pid, since: since, process: *spec.Process, records: rec.Stages, exited: make(chan struct{}), done: make(chan struct{})}
	c.run, c.version = r, rec.GuestOSVersion
	c.started = m.o.Now()
	if st, err := os.Stat(filepath.Join("/proc", fmt.Sprint(pid))); err == nil {
		c.started = st.ModTime()
	}
	state := Running
	if paused {
		state = Frozen
	}
	c.state, c.reason = state, "re-adopted after daemon restart"
	m.publishLocked(c)
	name := c.cfg.GetName()
	m.mu.Unlock()
	m.watch(c, r, reader)
	m.record(ctx, "container.adopt", c.uuid, name, nil, fmt.Sprintf("init pid %d", pid))
	return nil
}

// sweepCgroups removes cgroups of containers that no longer run. rmdir on
// a cgroup fails while it has tasks, so a live one cannot be removed.
func (m *Manager) sweepCgroups(alive map[string]bool, known map[string]*Container) {
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
				if _, ok := known[e.Name()]; ok || len(e.Name()) == 36 {
					os.Remove(filepath.Join(p, e.Name()))
				}
			}
		}
	}
}

// Autostart starts every stopped container whose config allows it.
func (m *Manager) Autostart(ctx context.Context) {
	type todo struct{ id, name string }
	var list []todo
	m.mu.Lock()
	for id, c := range m.containers {
		if c.cfg.GetAllowAutostart() && c.run == nil {
			list = append(list, todo{id, c.cfg.GetName()})
		}
	}
	m.mu.Unlock()
	for _, t := range list {
		_, err := m.Start(ctx, t.id, StartOptions{})
		if err != nil {
			m.o.Log.Error("autostart failed", "container", t.name, "err", err)
		}
		m.record(ctx, "container.autostart", t.id, t.name, err, "")
	}
}
