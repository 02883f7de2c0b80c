// Command cmlverify verifies CML devices' attestations (quote, certificate
// chain, measurement log, signed guest OS and config of every container)
// without a TPM (docs/attestation.md), and their audit trails (cmlverify
// audit; docs/audit.md).
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
	"github.com/cmlproject/cml/internal/auditlog"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := attest.NewCommand(os.Stdout)
	root.AddCommand(auditlog.NewCommand(os.Stdout))
	err := root.ExecuteContext(ctx)
	switch {
	case err == nil:
	case errors.Is(err, attest.ErrFailed), errors.Is(err, auditlog.ErrFailed):
		os.Exit(1)
	default:
		fmt.Fprintln(os.Stderr, "cmlverify: "+strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", " "))
		os.Exit(2)
	}
}
