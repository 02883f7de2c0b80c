// Package containertest provides a fake OCI runtime for unit tests of the
// container manager: no root, no processes, with injectable delays and
// errors per operation and init exits on demand. It implements the
// manager's Runtime and Exits interfaces. The real runtime is exercised by
// the end-to-end tests.
package containertest

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/reaper"
)

// Runtime is a fake OCI runtime. Its zero value is not usable; call New.
type Runtime struct {
	mu      sync.Mutex
	procs   map[string]*proc // by container id
	byPid   map[int]*proc
	nextPid int
	hooks   map[string]func(ctx context.Context, id string) error
	calls   map[string]int
}

type proc struct {
	id     string
	pid    int
	status string // running, paused
	exit   chan reaper.Exit
	exited bool
}

// New returns an empty fake runtime.
func New() *Runtime {
	return &Runtime{procs: map[string]*proc{}, byPid: map[int]*proc{}, nextPid: 1000, hooks: map[string]func(context.Context, string) error{}, calls: map[string]int{}}
}

// Hook runs f at the start of every call of op ("run", "kill", "delete",
// "pause", "resume", "list", "exec"); an error from f fails the call. f
// may block (a slow runtime) and should honour ctx.
func (r *Runtime) Hook(op string, f func(ctx context.Context, id string) error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hooks[op] = f
}

// Calls returns how often op was called.
func (r *Runtime) Calls(op string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls[op]
}

func (r *Runtime) enter(ctx context.Context, op, id string) error {
	r.mu.Lock()
	r.calls[op]++
	h := r.hooks[op]
	r.mu.Unlock()
	if h != nil {
		return h(ctx, id)
	}
	return nil
}

// Exit makes container id's init exit now with e, as if it died.
func (r *Runtime) Exit(id string, e reaper.Exit) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.procs[id]
	if p == nil || p.exited {
		return false
	}
	r.exitLocked(p, e)
	return true
}

func (r *Runtime) exitLocked(p *proc, e reaper.Exit) {
	p.exited = true
	p.status = "stopped"
	p.exit <- e
}

// Running lists the ids whose init runs.
func (r *Runtime) Running() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ids []string
	for id, p := range r.procs {
		if !p.exited {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

// Run implements the manager's Runtime.
func (r *Runtime) Run(ctx context.Context, id, bundle, pidFile string, stdio *os.File) error {
	if err := r.enter(ctx, "run", id); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.procs[id]; p != nil {
		return fmt.Errorf("runc run: container %s exists", id)
	}
	r.nextPid++
	p := &proc{id: id, pid: r.nextPid, status: "running", exit: make(chan reaper.Exit, 1)}
	r.procs[id], r.byPid[p.pid] = p, p
	return os.WriteFile(pidFile, []byte(strconv.Itoa(p.pid)), 0o600)
}

// Kill implements the manager's Runtime: any signal but 0 ends init (a
// fake init has no handlers), SIGSTOP and SIGCONT aside.
func (r *Runtime) Kill(ctx context.Context, id string, sig syscall.Signal, all bool) error {
	if err := r.enter(ctx, "kill", id); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.procs[id]
	if p == nil || p.exited {
		return fmt.Errorf("runc kill: %w", oci.ErrNotExist)
	}
	if sig != syscall.SIGSTOP && sig != syscall.SIGCONT && sig != 0 {
		r.exitLocked(p, reaper.Exit{Signal: sig, Known: true})
	}
	return nil
}

// Delete implements the manager's Runtime.
func (r *Runtime) Delete(ctx context.Context, id string, force bool) error {
	if err := r.enter(ctx, "delete", id); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.procs[id]
	if p == nil {
		return nil
	}
	if !p.exited {
		if !force {
			return errdefs.FailedPrecondition("runc delete: container %s is running", id)
		}
		r.exitLocked(p, reaper.Exit{Signal: syscall.SIGKILL, Known: true})
	}
	delete(r.procs, id)
	return nil
}

func (r *Runtime) setStatus(ctx context.Context, op, id, from, to string) error {
	if err := r.enter(ctx, op, id); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.procs[id]
	if p == nil || p.exited {
		return fmt.Errorf("runc %s: %w", op, oci.ErrNotExist)
	}
	if p.status != from {
		return fmt.Errorf("runc %s: container is %s, not %s", op, p.status, from)
	}
	p.status = to
	return nil
}

// Pause implements the manager's Runtime.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	return r.setStatus(ctx, "pause", id, "running", "paused")
}

// Resume implements the manager's Runtime.
func (r *Runtime) Resume(ctx context.Context, id string) error {
	return r.setStatus(ctx, "resume", id, "paused", "running")
}

// List implements the manager's Runtime.
func (r *Runtime) List(ctx context.Context) ([]oci.State, error) {
	if err := r.enter(ctx, "list", ""); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []oci.State
	for id, p := range r.procs {
		out = append(out, oci.State{ID: id, Pid: p.pid, Status: p.status})
	}
	return out, nil
}

// Exec implements the manager's Runtime.
func (r *Runtime) Exec(ctx context.Context, id string, p *specs.Process, dir string, sio oci.ExecIO) (int, error) {
	if err := r.enter(ctx, "exec", id); err != nil {
		return -1, err
	}
	return 0, nil
}

// Wait implements the manager's Exits.
func (r *Runtime) Wait(pid int, since time.Time) <-chan reaper.Exit {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.byPid[pid]; p != nil {
		return p.exit
	}
	ch := make(chan reaper.Exit, 1)
	ch <- reaper.Exit{}
	return ch
}
