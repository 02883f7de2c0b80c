// Command cmlsign signs guest OS bundles and container configs for CML; see
// docs/signing.md.
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/cmlproject/cml/internal/cmlsign"
)

func main() {
	if err := cmlsign.NewCommand(os.Stdout).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "cmlsign: "+strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", " "))
		os.Exit(1)
	}
}
