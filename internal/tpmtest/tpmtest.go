// Package tpmtest gives tests a real TPM: the go-tpm-tools reference
// simulator in-process, or a swtpm (a second, independent device). Both
// are closed at test cleanup. It is for tests only.
package tpmtest

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm-tools/simulator"

	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/tpm"
)

// Simulator returns a connection to the reference simulator. Only one can
// be open per process at a time.
func Simulator(t testing.TB) *tpm.Conn {
	t.Helper()
	s, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	c := tpm.NewConn(s, "simulator")
	t.Cleanup(func() { c.Close() })
	return c
}

// Swtpm starts a swtpm on a fresh state directory and returns a
// connection and its command socket (for tpm2-tools). It skips the test
// when swtpm is not installed.
func Swtpm(t testing.TB) (*tpm.Conn, string) {
	t.Helper()
	testutil.RequireTool(t, "swtpm")
	dir := t.TempDir()
	s, err := tpm.StartSwtpm(context.Background(), dir, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	c, err := s.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, filepath.Join(dir, "tpm.sock")
}
