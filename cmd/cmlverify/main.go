// Command cmlverify verifies CML devices' attestations (quote, certificate
// chain, measurement log, signed guest OS and config of every container)
// without a TPM; see docs/attestation.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/cmlproject/cml/internal/attest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := attest.NewCommand(os.Stdout).ExecuteContext(ctx)
	switch {
	case err == nil:
	case errors.Is(err, attest.ErrFailed):
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "cmlverify: "+strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", " "))
		os.Exit(2)
	}
}
