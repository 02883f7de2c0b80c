// Package reaper collects the exit status of processes that cmld, as the
// child subreaper, inherits: container inits once `runc run --detach`
// exits, processes runc left behind when a start was cancelled half-way,
// and exec'd processes whose runc exec went away.
//
// A plain wait4(-1) loop would steal the statuses of cmld's own commands
// (exec.Cmd waits for those itself), so the reaper reaps only children it
// can tell were inherited: processes in a pid namespace below cmld's (the
// container's) and runc's own intermediate stages ("runc:[...]", or a
// descriptor number before runc renames itself). Every
// other child is left to whoever started it. Waiters ask for one pid; a
// process that is not cmld's child (a container re-adopted after a daemon
// restart) is followed through a pidfd, with its status unknown.
//
// It does not start or signal processes.
package reaper

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Exit is how a process ended. Code and Signal are exclusive: an init that
// called exit(130) has Code 130 and Signal 0; one killed by SIGINT has
// Signal 2. Known is false when the status could not be collected (the
// process was not cmld's child).
type Exit struct {
	Code   int
	Signal syscall.Signal
	Known  bool
}

func (e Exit) String() string {
	switch {
	case !e.Known:
		return "exited (status unknown: not a child of this daemon)"
	case e.Signal != 0:
		return fmt.Sprintf("killed by signal %d (%s)", int(e.Signal), unix.SignalName(e.Signal))
	default:
		return fmt.Sprintf("exited with status %d", e.Code)
	}
}

// keep bounds how many unclaimed statuses are remembered: the inits of
// failed or cancelled starts that nobody will ask for.
const keep = 1024

type reaped struct {
	exit Exit
	at   time.Time
}

// Reaper reaps inherited children. Run must be running for Wait to learn
// of exits.
type Reaper struct {
	log     *slog.Logger
	mu      sync.Mutex
	waiters map[int][]chan Exit
	exited  map[int]reaped
	kick    chan struct{}
}

// New returns a Reaper; call Run.
func New(log *slog.Logger) *Reaper {
	if log == nil {
		log = slog.Default()
	}
	return &Reaper{log: log, waiters: map[int][]chan Exit{}, exited: map[int]reaped{}, kick: make(chan struct{}, 1)}
}

// Run reaps on every SIGCHLD (and every second, as a safety net against a
// coalesced signal) until ctx ends.
func (r *Reaper) Run(ctx context.Context) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, unix.SIGCHLD)
	defer signal.Stop(sig)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		r.Reap()
		select {
		case <-ctx.Done():
			return
		case <-sig:
		case <-r.kick:
		case <-t.C:
		}
	}
}

// Reap collects every inherited zombie now.
func (r *Reaper) Reap() {
	for _, pid := range children() {
		if !inherited(pid) {
			continue
		}
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		if err != nil || got != pid {
			continue
		}
		e := Exit{Known: true}
		if ws.Signaled() {
			e.Signal = ws.Signal()
		} else {
			e.Code = ws.ExitStatus()
		}
		r.deliver(pid, e)
	}
}

func (r *Reaper) deliver(pid int, e Exit) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ws := r.waiters[pid]; len(ws) > 0 {
		for _, w := range ws {
			w <- e
		}
		delete(r.waiters, pid)
		return
	}
	if len(r.exited) >= keep {
		var oldest int
		var at time.Time
		for p, x := range r.exited {
			if at.IsZero() || x.at.Before(at) {
				oldest, at = p, x.at
			}
		}
		delete(r.exited, oldest)
	}
	r.exited[pid] = reaped{exit: e, at: time.Now()}
	r.log.Debug("reaped an inherited process nobody waits for", "pid", pid, "exit", e.String())
}

// Wait returns a channel that receives pid's exit once. since is when the
// caller learned of pid: a status reaped before it belongs to an earlier
// process with the same number and is ignored.
func (r *Reaper) Wait(pid int, since time.Time) <-chan Exit {
	ch := make(chan Exit, 1)
	r.mu.Lock()
	if x, ok := r.exited[pid]; ok {
		delete(r.exited, pid)
		if !x.at.Before(since) {
			r.mu.Unlock()
			ch <- x.exit
			return ch
		}
	}
	if parent(pid) == os.Getpid() {
		r.waiters[pid] = append(r.waiters[pid], ch)
		r.mu.Unlock()
		// It may have died before it was registered.
		select {
		case r.kick <- struct{}{}:
		default:
		}
		return ch
	}
	r.mu.Unlock()
	// Not ours (re-adopted after a restart, or already gone): follow it
	// through a pidfd; its status is not ours to collect.
	go func() {
		waitPidfd(pid)
		// Reap may have collected it just before the parent check above;
		// its status then arrives in exited shortly.
		for i := 0; i < 10; i++ {
			if x, ok := r.claim(pid, since); ok {
				ch <- x
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		ch <- Exit{}
	}()
	return ch
}

func (r *Reaper) claim(pid int, since time.Time) (Exit, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	x, ok := r.exited[pid]
	if !ok || x.at.Before(since) {
		return Exit{}, false
	}
	delete(r.exited, pid)
	return x.exit, true
}

func waitPidfd(pid int) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != unix.EINTR {
			return
		}
	}
}

// children lists cmld's child processes (all threads: an orphan is
// re-parented to any thread of the subreaper).
func children() []int {
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out = append(out, pid)
			}
		}
	}
	return out
}

// inherited tells a process cmld inherited from one it started: it lives
// in a deeper pid namespace (a container process) or is one of runc's
// nsexec stages, which only become cmld's children when runc dies.
func inherited(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		switch {
		case bytes.HasPrefix(line, []byte("Name:")):
			name := bytes.TrimSpace(line[5:])
			if bytes.HasPrefix(name, []byte("runc:[")) || numeric(name) {
				return true
			}
		case bytes.HasPrefix(line, []byte("NSpid:")):
			return len(bytes.Fields(line[6:])) > 1
		}
	}
	return false
}

// numeric reports a command name of digits only: runc 1.2 and later
// re-executes itself from a sealed memfd (fexecve), so until its nsexec
// stage renames it, its name is the descriptor number. cmld starts no
// program that way.
func numeric(name []byte) bool {
	if len(name) == 0 {
		return false
	}
	for _, c := range name {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// parent returns pid's parent, or 0.
func parent(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name may contain spaces and parentheses; fields follow
	// the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 2 {
		return 0
	}
	p, _ := strconv.Atoi(string(f[1]))
	return p
}
