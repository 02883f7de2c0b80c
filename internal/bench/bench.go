// Package bench measures CML against its baselines: container start latency
// through cmld (cmlctl start until init runs) versus a bare `runc run
// --detach` of an equivalent bundle (same image, same isolation spec). It
// prints figures; it asserts nothing.
package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/seccomp"
)

// Options for Run.
type Options struct {
	Runs     int
	Parallel int
	Script   string
	// VerifyMiB sizes the image of the verification throughput figure.
	VerifyMiB int
	// Only runs one part: "verify", "attest" or "start"; empty runs all.
	Only string
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
	defer func() { rootfs.Unmount(tmp); os.RemoveAll(tmp) }()
	if o.Only == "" || o.Only == "verify" {
		if err := Verification(w, tmp, o.VerifyMiB, 5); err != nil {
			return err
		}
	}
	if o.Only == "" || o.Only == "attest" {
		if err := Attestation(w, tmp, 50); err != nil {
			return fmt.Errorf("attestation: %w", err)
		}
	}
	if o.Only != "" && o.Only != "start" {
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
	conf := func(name string) string {
		p := filepath.Join(tmp, name+".conf")
		os.WriteFile(p, []byte(fmt.Sprintf("name: %q\nguest_os: \"busybox\"\nram_limit: 64\nstop_timeout: 1\n", name)), 0o644)
		exec.Command(filepath.Join(bin, "cmlsign"), "config", "--key", filepath.Join(pki, "signer.key"), "--cert", filepath.Join(pki, "signer.pem"), p).Run()
		return p
	}
	if err := ctl("create", conf("bench")); err != nil {
		return err
	}

	fmt.Fprintf(w, "container start latency, signed busybox guest OS, %d runs each (config signature and full image verity check before each start; user namespace, seccomp, cgroup limits)\n", o.Runs)
	var cml []time.Duration
	for i := 0; i < o.Runs; i++ {
		t0 := time.Now()
		if err := ctl("start", "bench"); err != nil {
			return err
		}
		cml = append(cml, time.Since(t0))
		if err := ctl("stop", "bench"); err != nil {
			return err
		}
	}
	bare, err := bareRunc(tmp, gos, o.Runs)
	if err != nil {
		return err
	}
	mc, mb := median(cml), median(bare)
	fmt.Fprintf(w, "  (a) cmlctl start (until init runs)   median %7.1f ms\n", ms(mc))
	fmt.Fprintf(w, "  (b) bare runc run --detach           median %7.1f ms\n", ms(mb))
	fmt.Fprintf(w, "  ratio a/b                            %7.2f   (goal <= 1.5)\n", float64(mc)/float64(mb))

	// Concurrency: N containers started at once.
	var names []string
	for i := 0; i < o.Parallel; i++ {
		n := fmt.Sprintf("par%d", i)
		if err := ctl("create", conf(n)); err != nil {
			return err
		}
		names = append(names, n)
	}
	lat := make([]time.Duration, len(names))
	var wg sync.WaitGroup
	var firstErr error
	var mu sync.Mutex
	for i, n := range names {
		wg.Add(1)
		go func(i int, n string) {
			defer wg.Done()
			t0 := time.Now()
			err := ctl("start", n)
			lat[i] = time.Since(t0)
			if err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
			}
		}(i, n)
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	fmt.Fprintf(w, "  %d containers started at once         median %7.1f ms, max %.1f ms\n", len(names), ms(median(lat)), ms(maxOf(lat)))
	for _, n := range names {
		ctl("stop", n)
	}
	return nil
}

// bareRunc runs an equivalent bundle with runc directly: the same image
// and overlay, the same isolation spec, no daemon.
func bareRunc(tmp, gos string, runs int) ([]time.Duration, error) {
	dir := filepath.Join(tmp, "bare")
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return nil, err
	}
	rfs, err := rootfs.Mount(filepath.Join(dir, "mnt"), rootfs.Request{Image: filepath.Join(gos, "root.img"), FSType: "erofs", UIDBase: 1100000, IDCount: 65536, DataDir: filepath.Join(dir, "data")})
	if err != nil {
		return nil, err
	}
	spec := oci.Spec(oci.SpecOptions{
		Hostname: "bare", Rootfs: rfs, Args: []string{"/sbin/init"}, Env: []string{"PATH=/bin:/sbin"},
		UIDBase: 1100000, IDCount: 65536, NetNS: true, MemoryBytes: 64 << 20, PidsLimit: 1024,
		Capabilities: oci.DefaultCapabilities, Seccomp: seccomp.Default(seccomp.Options{}), CgroupsPath: "/cmlbench/bare",
	})
	bundle := filepath.Join(dir, "bundle")
	if err := oci.WriteBundle(bundle, spec); err != nil {
		return nil, err
	}
	rt := &oci.Runtime{Binary: "runc", Root: filepath.Join(dir, "runc")}
	ctx := context.Background()
	devnull, _ := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	defer devnull.Close()
	var out []time.Duration
	for i := 0; i < runs; i++ {
		id := fmt.Sprintf("bare%d", i)
		t0 := time.Now()
		cmd := exec.Command("runc", "--root", rt.Root, "run", "--detach", "--bundle", bundle, id)
		// A file, not a pipe: the detached init inherits it and would keep
		// a pipe open past runc's exit.
		errf, _ := os.CreateTemp(dir, "stderr-")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, errf
		err := cmd.Run()
		errf.Close()
		if err != nil {
			b, _ := os.ReadFile(errf.Name())
			return nil, fmt.Errorf("bare runc run: %v: %s", err, strings.TrimSpace(string(b)))
		}
		out = append(out, time.Since(t0))
		rt.Delete(ctx, id, true)
	}
	return out, nil
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func maxOf(d []time.Duration) time.Duration {
	m := d[0]
	for _, x := range d {
		if x > m {
			m = x
		}
	}
	return m
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
