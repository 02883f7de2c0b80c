package container

import (
	"context"
	"os"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/reaper"
)

// Runtime is what the manager needs of an OCI runtime. package oci's runc
// driver implements it; unit tests use a fake with injected errors and
// delays. Errors for a container the runtime does not know wrap
// errdefs.ErrNotFound.
type Runtime interface {
	// Run creates and starts id from bundle, detached, with stdio as the
	// init's standard I/O, and writes the init's pid to pidFile.
	Run(ctx context.Context, id, bundle, pidFile string, stdio *os.File) error
	Kill(ctx context.Context, id string, sig syscall.Signal, all bool) error
	// Delete removes the runtime state; with force it kills first. A
	// container the runtime does not know is not an error.
	Delete(ctx context.Context, id string, force bool) error
	Pause(ctx context.Context, id string) error
	Resume(ctx context.Context, id string) error
	List(ctx context.Context) ([]oci.State, error)
	Exec(ctx context.Context, id string, p *specs.Process, dir string, sio oci.ExecIO) (int, error)
}

// Exits tells when a container's init ends. package reaper implements it
// for real processes; since is when the caller learned of pid.
type Exits interface {
	Wait(pid int, since time.Time) <-chan reaper.Exit
}
