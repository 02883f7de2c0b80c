// Package bench measures CML against its baselines: container start latency
// through cmld (cmlctl start until init runs) versus a bare `runc run
// --detach` of an equivalent bundle (same image, same isolation spec). It
// prints figures; it asserts nothing.
package bench

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/rootfs"
)

// Options for Run.
type Options struct {
	Runs     int
	Parallel int
	Script   string
	// VerifyMiB sizes the image of the verification throughput figure.
	VerifyMiB int
	// Only runs one part: "verify", "audit", "attest", "start",
	// "network", "storage" or "console"; empty
	// runs all.
	Only string
	// ConsoleMiB is how much a container floods its console with.
	ConsoleMiB int
}

// Run runs the benchmark and prints its report to w.
func Run(o Options, w io.Writer) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root")
	}
	self, _ := os.Executable()
	bin := filepath.Dir(self)
	tmp, err := os.MkdirTemp("", "cmlbench-")
	if err != nil {
		return err
	}
	os.Chmod(tmp, 0o711)
	defer func() {
		rootfs.Unmount(tmp)
		// cmld's trail is append-only (chattr +a).
		audit.SetAppendOnly(filepath.Join(tmp, "state", "audit.log"), false)
		audit.SetAppendOnly(filepath.Join(tmp, "state", "audit.log.checkpoints"), false)
		os.RemoveAll(tmp)
	}()
	if o.Only == "" || o.Only == "verify" {
		if err := Verification(w, tmp, o.VerifyMiB, 5); err != nil {
			return err
		}
	}
	if o.Only == "" || o.Only == "audit" {
		if err := auditThroughput(w, tmp); err != nil {
			return fmt.Errorf("audit: %w", err)
		}
	}
	if o.Only == "" || o.Only == "attest" {
		if err := Attestation(w, tmp, 50); err != nil {
			return fmt.Errorf("attestation: %w", err)
		}
	}
	if o.Only != "" && o.Only != "start" && o.Only != "console" && o.Only != "network" && o.Only != "storage" {
		return nil
	}
	// A signed busybox guest OS and configs under a throwaway PKI whose
	// root is provisioned as the vendor CA: starts below pay for the full
	// pre-start verification of config and image.
	pki := filepath.Join(tmp, "pki")
	if out, err := exec.Command(filepath.Join(bin, "cmlsign"), "pki", "init", "--dir", pki).CombinedOutput(); err != nil {
		return fmt.Errorf("cmlsign pki init: %v: %s", err, out)
	}
	vendor := filepath.Join(tmp, "state", "trust", "vendor")
	os.MkdirAll(vendor, 0o700)
	if b, err := os.ReadFile(filepath.Join(pki, "root-ca.pem")); err != nil || os.WriteFile(filepath.Join(vendor, "vendor.pem"), b, 0o600) != nil {
		return fmt.Errorf("provision vendor CA: %v", err)
	}
	gos := filepath.Join(tmp, "guestos")
	build := exec.Command(o.Script, gos, pki, "busybox", "1")
	build.Env = append(os.Environ(), "CMLSIGN="+filepath.Join(bin, "cmlsign"))
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build guest OS: %v: %s", err, out)
	}
	// The device's network settings: an uplink into the bench's own
	// outside namespace (made below, for the network figures).
	if err := os.WriteFile(filepath.Join(tmp, "state", "device.conf"), []byte(benchNetConf), 0o600); err != nil {
		return err
	}
	sock := filepath.Join(tmp, "run", "control.sock")
	cmld := exec.Command(filepath.Join(bin, "cmld"), "--state-dir", filepath.Join(tmp, "state"), "--run-dir", filepath.Join(tmp, "run"))
	if err := cmld.Start(); err != nil {
		return err
	}
	defer func() {
		cmld.Process.Signal(syscall.SIGTERM)
		cmld.Wait()
		exec.Command("runc", "--root", filepath.Join(tmp, "run", "runtime"), "list", "-q").Run()
	}()
	ctl := func(args ...string) error {
		out, err := exec.Command(filepath.Join(bin, "cmlctl"), append([]string{"--socket", sock}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("cmlctl %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
		}
		return nil
	}
	for i := 0; i < 100; i++ {
		if ctl("list") == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := ctl("guestos", "install", gos); err != nil {
		return err
	}
	conf := func(name string, extra ...string) string {
		p := filepath.Join(tmp, name+".conf")
		os.WriteFile(p, []byte(fmt.Sprintf("name: %q\nguest_os: \"busybox\"\nram_limit: 64\nstop_timeout: 1\n%s", name, strings.Join(extra, ""))), 0o644)
		exec.Command(filepath.Join(bin, "cmlsign"), "config", "--key", filepath.Join(pki, "signer.key"), "--cert", filepath.Join(pki, "signer.pem"), p).Run()
		return p
	}
	if err := ctl("create", conf("bench")); err != nil {
		return err
	}

	if o.Only == "" || o.Only == "start" {
		if err := startLatency(w, tmp, gos, ctl, conf, sock, o); err != nil {
			return err
		}
	}
	if o.Only == "" || o.Only == "network" {
		cleanup, err := benchNetwork()
		if err != nil {
			return fmt.Errorf("network figures: %w", err)
		}
		err = networkFigures(w, tmp, ctl, conf, sock, o)
		cleanup()
		exec.Command("nft", "delete", "table", "inet", "cmlbench").Run()
		if err != nil {
			return fmt.Errorf("network figures: %w", err)
		}
	}
	if o.Only == "" || o.Only == "storage" {
		if err := storageFigures(w, tmp, ctl, conf, sock, o); err != nil {
			return fmt.Errorf("storage figures: %w", err)
		}
	}
	if o.Only == "" || o.Only == "console" {
		return consoleFlood(w, ctl, conf, cmld.Process.Pid, o.ConsoleMiB)
	}
	return nil
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
