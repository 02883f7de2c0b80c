package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/seccomp"
)

// candidate is one way of starting a container, timed from request to
// init running; reset (untimed) makes it startable again.
type candidate struct {
	name  string
	start func() (time.Duration, error)
	reset func()
}

// startLatency measures, in interleaved rounds (A, B, C, D, A, B, ...),
// a start through the API with a persistent client (the daemon's own
// cost), a bare `runc run --detach` of an equivalent bundle, `cmlctl
// start` (what a user types) and `podman start` of an equivalent busybox
// container (the peer a user would otherwise pick). Ratios are the median
// of per-round ratios, so machine noise that hits a whole round cancels.
func startLatency(w io.Writer, tmp, gos string, ctl func(...string) error, conf func(string, ...string) string, sock string, o Options) error {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	api := cmlv1.NewControlClient(conn)
	ctx := context.Background()
	ref := func(n string) *cmlv1.ContainerRef { return &cmlv1.ContainerRef{NameOrUuid: proto.String(n)} }
	stop := func(n string) {
		api.Stop(ctx, &cmlv1.StopRequest{NameOrUuid: proto.String(n), TimeoutSeconds: proto.Uint32(1)})
	}
	for _, n := range []string{"bench", "benchctl"} {
		if n != "bench" {
			if err := ctl("create", conf(n)); err != nil {
				return err
			}
		}
	}
	var stages []map[string]time.Duration
	apiStart := candidate{name: "API start, persistent client", start: func() (time.Duration, error) {
		t0 := time.Now()
		c, err := api.Start(ctx, ref("bench"))
		d := time.Since(t0)
		if err == nil {
			stages = append(stages, runTimings(filepath.Join(tmp, "run", "containers", c.GetUuid(), "run.json")))
		}
		return d, err
	}, reset: func() { stop("bench") }}
	ctlStart := candidate{name: "cmlctl start", start: func() (time.Duration, error) {
		t0 := time.Now()
		err := ctl("start", "benchctl")
		return time.Since(t0), err
	}, reset: func() { stop("benchctl") }}
	bare, err := newBare(tmp, gos, o.Parallel)
	if err != nil {
		return err
	}
	defer bare.close()
	bareRun := candidate{name: "bare runc run --detach", start: func() (time.Duration, error) { return bare.run(0) }, reset: func() { bare.delete(0) }}
	cands := []candidate{apiStart, bareRun, ctlStart}
	pod, err := newPodman(tmp, gos)
	if err != nil {
		fmt.Fprintf(w, "  (podman left out: %v)\n", err)
	} else {
		defer pod.close()
		cands = append(cands, candidate{name: "podman start", start: pod.start, reset: pod.stop})
	}

	fmt.Fprintf(w, "container start latency, signed busybox guest OS, %d interleaved rounds, order rotating (config signature and full image verity check, TPM measurement, user namespace, seccomp, cgroup limits)\n", o.Runs)
	times := make([][]time.Duration, len(cands))
	for round := 0; round < o.Runs; round++ {
		// The order rotates each round, so no candidate always follows
		// the same one (podman's teardown, say, still running).
		for k := range cands {
			i := (round + k) % len(cands)
			c := cands[i]
			d, err := c.start()
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			times[i] = append(times[i], d)
			c.reset()
		}
	}
	letters := "abcd"
	for i, c := range cands {
		fmt.Fprintf(w, "  (%c) %-34s median %7.1f ms\n", letters[i], c.name, ms(median(times[i])))
	}
	goals := map[int]string{0: "goal <= 1.15", 2: "goal <= 1.3"}
	for i := range cands {
		if i == 1 {
			continue
		}
		fmt.Fprintf(w, "  %c/b median of per-round ratios         %7.2f   %s\n", letters[i], medianRatio(times[i], times[1]), goals[i])
	}
	if len(cands) == 4 {
		faster := 0
		for r := range times[0] {
			if times[0][r] < times[3][r] {
				faster++
			}
		}
		fmt.Fprintf(w, "  a faster than podman start in %d of %d rounds; a/d median ratio %.2f\n", faster, o.Runs, medianRatio(times[0], times[3]))
	}
	// Where (a)'s time goes.
	fmt.Fprintf(w, "  (a) per stage, median ms: %s; the runtime's share is runc run itself (bare: %.1f)\n", perStage(stages), ms(median(times[1])))

	// Concurrency: N starts at once through the API against N bare runc
	// runs at once, interleaved by round.
	n := o.Parallel
	var names []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("par%d", i)
		if err := ctl("create", conf(name)); err != nil {
			return err
		}
		names = append(names, name)
	}
	rounds := max(3, o.Runs/4)
	var apiAll, bareAll []time.Duration
	var parStages []map[string]time.Duration
	for r := 0; r < rounds; r++ {
		uuids := make([]string, n)
		d, err := together(n, func(i int) error {
			c, err := api.Start(ctx, ref(names[i]))
			uuids[i] = c.GetUuid()
			return err
		})
		if err != nil {
			return fmt.Errorf("concurrent API starts: %w", err)
		}
		for _, id := range uuids {
			parStages = append(parStages, runTimings(filepath.Join(tmp, "run", "containers", id, "run.json")))
		}
		apiAll = append(apiAll, d)
		together(n, func(i int) error { stop(names[i]); return nil })
		d, err = together(n, func(i int) error { _, err := bare.run(i); return err })
		if err != nil {
			return fmt.Errorf("concurrent bare runc runs: %w", err)
		}
		bareAll = append(bareAll, d)
		together(n, func(i int) error { bare.delete(i); return nil })
	}
	fmt.Fprintf(w, "  %d starts at once through the API, all running after   median %7.1f ms\n", n, ms(median(apiAll)))
	fmt.Fprintf(w, "  %d bare runc runs at once, all running after           median %7.1f ms\n", n, ms(median(bareAll)))
	fmt.Fprintf(w, "  ratio, median of %d per-round ratios                   %7.2f   goal <= 1.3\n", rounds, medianRatio(apiAll, bareAll))
	fmt.Fprintf(w, "  concurrent API starts per stage, median ms: %s\n", perStage(parStages))
	return nil
}

// perStage formats the median time of each stage over runs.
func perStage(runs []map[string]time.Duration) string {
	var parts []string
	for _, st := range []string{"verify", "devices", "rootfs", "measure", "bundle", "runtime"} {
		var ds []time.Duration
		for _, m := range runs {
			ds = append(ds, m[st])
		}
		if len(ds) > 0 {
			parts = append(parts, fmt.Sprintf("%s %.1f", st, ms(median(ds))))
		}
	}
	return strings.Join(parts, ", ")
}

// together runs f(0..n-1) at once and returns how long until all ended.
func together(n int, f func(int) error) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make([]error, n)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) { defer wg.Done(); errs[i] = f(i) }(i)
	}
	wg.Wait()
	d := time.Since(t0)
	for _, err := range errs {
		if err != nil {
			return d, err
		}
	}
	return d, nil
}

func medianRatio(a, b []time.Duration) float64 {
	var r []float64
	for i := range a {
		if i < len(b) && b[i] > 0 {
			r = append(r, float64(a[i])/float64(b[i]))
		}
	}
	sort.Float64s(r)
	if len(r) == 0 {
		return 0
	}
	return r[len(r)/2]
}

// runTimings reads the per-stage timings cmld wrote into a run record.
func runTimings(path string) map[string]time.Duration {
	var rec struct {
		Timings []struct {
			Stage string        `json:"stage"`
			Took  time.Duration `json:"took_ns"`
		} `json:"timings"`
	}
	out := map[string]time.Duration{}
	b, err := os.ReadFile(path)
	if err != nil || json.Unmarshal(b, &rec) != nil {
		return out
	}
	for _, t := range rec.Timings {
		out[t.Stage] = t.Took
	}
	return out
}

// bare is n equivalent bundles run with runc directly: the same image and
// overlay, the same isolation spec, no daemon.
type bare struct {
	dir     string
	bundles []string
	root    string
	devnull *os.File
}

func newBare(tmp, gos string, n int) (*bare, error) {
	b := &bare{dir: filepath.Join(tmp, "bare"), root: filepath.Join(tmp, "bare", "runc")}
	for i := 0; i < max(n, 1); i++ {
		d := filepath.Join(b.dir, fmt.Sprint(i))
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, err
		}
		base := uint32(1100000 + i*65536)
		rfs, err := rootfs.Mount(filepath.Join(d, "mnt"), rootfs.Request{Image: filepath.Join(gos, "root.img"), FSType: "erofs", UIDBase: base, IDCount: 65536, DataDir: filepath.Join(d, "data")})
		if err != nil {
			return nil, err
		}
		spec := oci.Spec(oci.SpecOptions{
			Hostname: "bare", Rootfs: rfs, Args: []string{"/sbin/init"}, Env: []string{"PATH=/bin:/sbin"},
			UIDBase: base, IDCount: 65536, NetNS: true, MemoryBytes: 64 << 20, PidsLimit: 1024,
			Capabilities: oci.DefaultCapabilities, Seccomp: seccomp.Default(seccomp.Options{}), CgroupsPath: fmt.Sprintf("/cmlbench/bare%d", i),
		})
		bundle := filepath.Join(d, "bundle")
		if err := oci.WriteBundle(bundle, spec); err != nil {
			return nil, err
		}
		b.bundles = append(b.bundles, bundle)
	}
	var err error
	b.devnull, err = os.OpenFile(os.DevNull, os.O_RDWR, 0)
	return b, err
}

func (b *bare) run(i int) (time.Duration, error) {
	t0 := time.Now()
	cmd := exec.Command("runc", "--root", b.root, "run", "--detach", "--bundle", b.bundles[i], fmt.Sprintf("bare%d", i))
	// A file, not a pipe: the detached init inherits it and would keep a
	// pipe open past runc's exit.
	errf, _ := os.CreateTemp(b.dir, "stderr-")
	defer os.Remove(errf.Name())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = b.devnull, b.devnull, errf
	err := cmd.Run()
	d := time.Since(t0)
	errf.Close()
	if err != nil {
		out, _ := os.ReadFile(errf.Name())
		return d, fmt.Errorf("bare runc run: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return d, nil
}

func (b *bare) delete(i int) {
	exec.Command("runc", "--root", b.root, "delete", "--force", fmt.Sprintf("bare%d", i)).Run()
}

func (b *bare) close() {
	for i := range b.bundles {
		b.delete(i)
	}
	b.devnull.Close()
	rootfs.Unmount(b.dir)
}

// podman is an equivalent busybox container under podman: the same
// guest OS image, as an overlay root filesystem, no network.
type podman struct {
	name, dir string
}

func newPodman(tmp, gos string) (*podman, error) {
	if _, err := exec.LookPath("podman"); err != nil {
		return nil, fmt.Errorf("podman is not installed")
	}
	p := &podman{name: fmt.Sprintf("cmlbench-%d", os.Getpid()), dir: filepath.Join(tmp, "podman")}
	rfs, err := rootfs.Mount(filepath.Join(p.dir, "mnt"), rootfs.Request{Image: filepath.Join(gos, "root.img"), FSType: "erofs", DataDir: filepath.Join(p.dir, "data")})
	if err != nil {
		return nil, err
	}
	// This machine's hard limits are under podman's defaults: name them.
	out, err := exec.Command("podman", "create", "--name", p.name, "--network", "none",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--memory", "64m", "--rootfs", rfs, "/sbin/init").CombinedOutput()
	if err != nil {
		rootfs.Unmount(p.dir)
		return nil, fmt.Errorf("podman create: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return p, nil
}

func (p *podman) start() (time.Duration, error) {
	t0 := time.Now()
	out, err := exec.Command("podman", "start", p.name).CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return d, fmt.Errorf("podman start: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return d, nil
}

func (p *podman) stop() { exec.Command("podman", "stop", "-t", "0", p.name).Run() }

func (p *podman) close() {
	exec.Command("podman", "rm", "-f", p.name).Run()
	rootfs.Unmount(p.dir)
}
