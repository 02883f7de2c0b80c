package oci

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cmlproject/cml/internal/errdefs"
)

// Runtime is an OCI runtime binary with its own state directory.
type Runtime struct {
	// Binary is the runtime's path or name in $PATH ("runc").
	Binary string
	// Root is the runtime's state directory (--root).
	Root string
}

// State is what the runtime reports of a container.
type State struct {
	ID     string `json:"id"`
	Pid    int    `json:"pid"`
	Status string `json:"status"` // creating, created, running, paused, stopped
	Bundle string `json:"bundle"`
}

// ErrNotExist is returned when the runtime does not know the container. It
// is of class errdefs.ErrNotFound.
var ErrNotExist = errdefs.NotFound("container does not exist in the runtime")

// ErrExecNotStarted is of class FailedPrecondition: the runtime could not
// start the process (it never ran), as opposed to a process that ran and
// exited non-zero.
var ErrExecNotStarted = errdefs.FailedPrecondition("the process did not start")

// waitDelay bounds how long a runtime command may take to go away after it
// was cancelled, or to release its output after it exited (a process it
// left behind may hold the pipes): a stuck runtime must not hang cmld.
const waitDelay = 5 * time.Second

func (r *Runtime) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.Binary, append([]string{"--root", r.Root}, args...)...)
	// The runtime must not die with a cancelled request half-way through
	// setting up a container: give it SIGTERM, not SIGKILL, and SIGKILL
	// only after waitDelay.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = waitDelay
	return cmd
}

// failure keeps the cause of a failed command in the chain: a cancelled
// request stays context.Canceled, whatever the runtime printed.
func failure(ctx context.Context, what string, msg string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %s", what, msg)
}

// run runs the runtime and returns its output, with its error text.
func (r *Runtime) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := r.command(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "does not exist") || strings.Contains(msg, "not found") {
			return out, fmt.Errorf("%s %s: %w", filepath.Base(r.Binary), args[0], ErrNotExist)
		}
		return out, failure(ctx, filepath.Base(r.Binary)+" "+args[0], lastLine(msg, err))
	}
	return out, nil
}

func lastLine(msg string, err error) string {
	if msg == "" {
		return err.Error()
	}
	lines := strings.Split(msg, "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// Run creates and starts container id from bundle, detached; it returns
// once the container's init runs. The init inherits stdio (its console).
// Its pid is written to pidFile.
func (r *Runtime) Run(ctx context.Context, id, bundle, pidFile string, stdio *os.File) error {
	logFile := filepath.Join(bundle, "runtime.log")
	os.Remove(logFile)
	cmd := r.command(ctx, "--log", logFile, "--log-format", "json", "run", "--detach", "--bundle", bundle, "--pid-file", pidFile, id)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd.Stdin = devnull
	cmd.Stdout = stdio
	cmd.Stderr = stdio
	if err := cmd.Run(); err != nil {
		return failure(ctx, filepath.Base(r.Binary)+" run", runtimeError(logFile, err))
	}
	return nil
}

// runtimeError extracts the last error message from runc's JSON log.
func runtimeError(logFile string, err error) string {
	f, ferr := os.Open(logFile)
	if ferr != nil {
		return err.Error()
	}
	defer f.Close()
	msg := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e struct{ Level, Msg string }
		if json.Unmarshal(sc.Bytes(), &e) == nil && (e.Level == "error" || e.Level == "fatal") {
			msg = e.Msg
		}
	}
	if msg == "" {
		return err.Error()
	}
	return msg
}

// State queries the runtime for container id.
func (r *Runtime) State(ctx context.Context, id string) (*State, error) {
	out, err := r.run(ctx, "state", id)
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(out, &s); err != nil {
		return nil, fmt.Errorf("parse runtime state: %w", err)
	}
	return &s, nil
}

// List returns the runtime's containers.
func (r *Runtime) List(ctx context.Context) ([]State, error) {
	// runc 1.1 lists nothing for a missing root; newer runc fails.
	if _, err := os.Stat(r.Root); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	out, err := r.run(ctx, "list", "--format", "json")
	if err != nil {
		return nil, err
	}
	var ss []State
	if len(bytes.TrimSpace(out)) == 0 || bytes.Equal(bytes.TrimSpace(out), []byte("null")) {
		return nil, nil
	}
	if err := json.Unmarshal(out, &ss); err != nil {
		return nil, fmt.Errorf("parse runtime list: %w", err)
	}
	return ss, nil
}

// Kill sends sig to the container's init, or with all to every process.
func (r *Runtime) Kill(ctx context.Context, id string, sig syscall.Signal, all bool) error {
	args := []string{"kill"}
	if all {
		args = append(args, "--all")
	}
	_, err := r.run(ctx, append(args, id, strconv.Itoa(int(sig)))...)
	return err
}

// Delete removes the container's runtime state and cgroups; force kills it
// first if it still runs.
func (r *Runtime) Delete(ctx context.Context, id string, force bool) error {
	args := []string{"delete"}
	if force {
		args = append(args, "--force")
	}
	_, err := r.run(ctx, append(args, id)...)
	if errors.Is(err, ErrNotExist) {
		return nil
	}
	return err
}

// Pause freezes every process of the container.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	_, err := r.run(ctx, "pause", id)
	return err
}

// Resume thaws a paused container.
func (r *Runtime) Resume(ctx context.Context, id string) error {
	_, err := r.run(ctx, "resume", id)
	return err
}

// ExecIO is the standard I/O of an exec'd process. With a TTY, Stdin,
// Stdout and Stderr are all the terminal's slave side.
type ExecIO struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	TTY    bool
}

// Exec runs p in container id and returns its exit status (a code, or
// 128+signal). The process inherits the container's capabilities, seccomp
// profile and no_new_privileges.
func (r *Runtime) Exec(ctx context.Context, id string, p *specs.Process, dir string, sio ExecIO) (int, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return -1, err
	}
	f, err := os.CreateTemp(dir, "exec-*.json")
	if err != nil {
		return -1, err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return -1, err
	}
	f.Close()
	// The pid file tells runc's own failures (a fork refused at the pids
	// limit, say) from the command's exit status: runc writes it once the
	// process runs.
	pidFile := f.Name() + ".pid"
	logFile := f.Name() + ".log"
	defer os.Remove(pidFile)
	defer os.Remove(logFile)
	args := []string{"--log", logFile, "--log-format", "json", "exec", "--process", f.Name(), "--pid-file", pidFile}
	if sio.TTY {
		args = append(args, "--tty")
	}
	cmd := r.command(ctx, append(args, id)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = sio.Stdin, sio.Stdout, sio.Stderr
	// Background processes may hold the output open after the command
	// exits; do not wait for them longer than this.
	cmd.WaitDelay = time.Second
	if sio.TTY {
		// runc's tty code needs a controlling terminal to copy from.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	}
	err = cmd.Run()
	if _, perr := os.Stat(pidFile); perr != nil && err != nil {
		return -1, fmt.Errorf("%w: %s", ErrExecNotStarted, failure(ctx, filepath.Base(r.Binary)+" exec", runtimeError(logFile, err)))
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, fmt.Errorf("%s exec: %w", filepath.Base(r.Binary), err)
	}
	return 0, nil
}
