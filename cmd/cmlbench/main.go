// Command cmlbench measures image verification throughput against
// sha256sum and veritysetup, attestation (quote latency on swtpm, verifier
// throughput against tpm2_checkquote), and container start latency of cmld (signed
// guest OS, verified before each start) against a bare `runc run` of an
// equivalent bundle, network setup and throughput through cmld's rules
// against the same path without rules, in the same run on the same files, and prints medians
// and their ratios. It needs root, runc, and the binaries
// built by `make build`.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/cmlproject/cml/internal/bench"
)

func main() {
	var o bench.Options
	// Its own flag set: the TPM libraries register flags of their own
	// (SEV, TDX) on the global one, which are no options of this tool.
	flag := flag.NewFlagSet("cmlbench", flag.ExitOnError)
	flag.IntVar(&o.Runs, "runs", 20, "starts measured per variant")
	flag.IntVar(&o.Parallel, "parallel", 10, "containers started at once for the concurrency figure")
	flag.StringVar(&o.Script, "guestos-script", "scripts/build-demo-guestos.sh", "script that builds the busybox guest OS")
	flag.IntVar(&o.VerifyMiB, "verify-mib", 256, "image size for the verification throughput figure")
	flag.StringVar(&o.Only, "only", "", "run one part: verify, audit, attest, start, network, storage or console")
	flag.IntVar(&o.ConsoleMiB, "console-mib", 8, "MiB a container writes to its console for the console figure")
	flag.Parse(os.Args[1:])
	if err := bench.Run(o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "cmlbench:", err)
		os.Exit(1)
	}
}
