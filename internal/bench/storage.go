package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cmlproject/cml/internal/token"
	"github.com/cmlproject/cml/internal/tpm"
)

// storageFigures measures, inside containers, sequential write and read
// of 512 MiB and unpacking 5000 small files on an encrypted volume
// (gocryptfs+ext4, soft token) against the same on a plain one,
// interleaved; the first start's formatting; and the unlock latency of
// each token type.
func storageFigures(w io.Writer, tmp string, ctl func(...string) error, conf func(string, ...string) string, sock string, o Options) error {
	if _, err := exec.LookPath("gocryptfs"); err != nil {
		fmt.Fprintln(w, "storage: left out (gocryptfs not installed)")
		return nil
	}
	pin := filepath.Join(tmp, "bench.pin")
	os.WriteFile(pin, []byte("bench-pin-1\n"), 0o600)
	for _, c := range []struct{ name, extra string }{{"benchplain", ""}, {"benchcrypt", "token_type: SOFT\n"}} {
		if err := ctl("create", conf(c.name, c.extra)); err != nil {
			return err
		}
	}
	t0 := time.Now()
	if err := ctl("start", "benchcrypt", "--pin-file", pin); err != nil {
		return err
	}
	first := time.Since(t0)
	if err := ctl("start", "benchplain"); err != nil {
		return err
	}
	defer ctl("stop", "benchcrypt")
	defer ctl("stop", "benchplain")
	formatted := "?"
	if b, err := os.ReadFile(filepath.Join(tmp, "run", "containers", uuidOfRun(tmp, "benchcrypt"), "run.json")); err == nil {
		if i := strings.Index(string(b), `"formatted_ns":`); i >= 0 {
			n, _ := strconv.ParseInt(strings.TrimRight(strings.SplitN(string(b[i+15:]), ",", 2)[0], "}"), 10, 64)
			formatted = fmt.Sprintf("%.0f ms", float64(n)/1e6)
		}
	}
	// The small-file tree, packed on the host, unpacked in the container.
	src := filepath.Join(tmp, "small")
	for i := 0; i < 5000; i++ {
		d := filepath.Join(src, strconv.Itoa(i/100))
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, strconv.Itoa(i)), []byte(strings.Repeat("x", 512+i%1024)), 0o644)
	}
	tarball := filepath.Join(tmp, "small.tar")
	if out, err := exec.Command("tar", "-C", src, "-cf", tarball, ".").CombinedOutput(); err != nil {
		return fmt.Errorf("tar: %v %s", err, out)
	}
	cmlctl := filepath.Join(filepath.Dir(os.Args[0]), "cmlctl")
	run := func(name, script string, stdin string) (time.Duration, error) {
		cmd := exec.Command(cmlctl, "--socket", sock, "exec", name, "--", "sh", "-c", script)
		if stdin != "" {
			f, err := os.Open(stdin)
			if err != nil {
				return 0, err
			}
			defer f.Close()
			cmd.Stdin = f
		}
		t0 := time.Now()
		out, err := cmd.CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("%s in %s: %v %s", script, name, err, out)
		}
		return time.Since(t0), nil
	}
	dropCaches := func() { exec.Command("sync").Run(); os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) }
	type op struct {
		name, script, stdin string
		before              func()
	}
	ops := []op{
		{"write 512 MiB", "dd if=/dev/zero of=/root/f bs=1M count=512 conv=fsync 2>/dev/null", "", nil},
		{"read 512 MiB", "dd if=/root/f of=/dev/null bs=1M 2>/dev/null", "", dropCaches},
		{"unpack 5000 files", "rm -rf /root/t; mkdir /root/t; tar -C /root/t -xf - && sync", tarball, nil},
	}
	goals := map[string]string{"write 512 MiB": "goal >= 0.35", "read 512 MiB": "goal >= 0.8", "unpack 5000 files": "goal >= 0.7"}
	rounds := 3
	fmt.Fprintf(w, "storage: inside a container, encrypted volume (gocryptfs+ext4, soft token) against a plain one, %d interleaved pairs; throughput ratio = plain time / encrypted time\n", rounds)
	fmt.Fprintf(w, "  first encrypted start %.0f ms, of which formatting the volume %s\n", ms(first), formatted)
	for _, o := range ops {
		var enc, plain []time.Duration
		for r := 0; r < rounds; r++ {
			for _, name := range []string{"benchcrypt", "benchplain"} {
				if o.before != nil {
					o.before()
				}
				d, err := run(name, o.script, o.stdin)
				if err != nil {
					return err
				}
				if name == "benchcrypt" {
					enc = append(enc, d)
				} else {
					plain = append(plain, d)
				}
			}
		}
		fmt.Fprintf(w, "  %-18s encrypted median %7.0f ms, plain %7.0f ms; median of per-pair throughput ratios %.2f   %s\n", o.name, ms(median(enc)), ms(median(plain)), medianRatio(plain, enc), goals[o.name])
	}
	return unlockLatency(w, tmp)
}

func uuidOfRun(tmp, name string) string {
	ents, _ := os.ReadDir(filepath.Join(tmp, "state", "containers"))
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join(tmp, "state", "containers", e.Name(), "config", "config.conf")); err == nil && strings.Contains(string(b), fmt.Sprintf("name: %q", name)) {
			return e.Name()
		}
	}
	return ""
}

// unlockLatency times Unwrap of each token type, 5 times each.
func unlockLatency(w io.Writer, tmp string) error {
	ctx := context.Background()
	id := "00000000-0000-4000-8000-0000000000be"
	backends := []token.Backend{token.Soft{}}
	if module := "/usr/lib/softhsm/libsofthsm2.so"; fileExists(module) {
		dir := filepath.Join(tmp, "hsm")
		os.MkdirAll(filepath.Join(dir, "tokens"), 0o700)
		conf := filepath.Join(dir, "softhsm2.conf")
		os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(dir, "tokens")+"\nobjectstore.backend = file\n"), 0o600)
		os.Setenv("SOFTHSM2_CONF", conf)
		if exec.Command("softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "bench-pin-1", "--so-pin", "so-pin-1").Run() == nil {
			backends = append(backends, &token.PKCS11{Module: module, Label: "bench"})
		}
	}
	if sw, err := tpm.StartSwtpm(ctx, filepath.Join(tmp, "benchtpm"), slog.New(slog.DiscardHandler)); err == nil {
		defer sw.Stop()
		if c, err := sw.Dial(); err == nil {
			defer c.Close()
			backends = append(backends, &token.TPM{RW: c})
		}
	}
	fmt.Fprintf(w, "  unlock latency (unwrap the container's secret), median of 5:")
	for _, b := range backends {
		dir := filepath.Join(tmp, "unlock-"+b.Name())
		os.MkdirAll(dir, 0o700)
		s, _ := token.NewSecret()
		if err := b.Wrap(ctx, dir, id, []byte("bench-pin-1"), s); err != nil {
			return fmt.Errorf("%s token: %w", b.Name(), err)
		}
		var ds []time.Duration
		for i := 0; i < 5; i++ {
			t0 := time.Now()
			if _, err := b.Unwrap(ctx, dir, id, []byte("bench-pin-1")); err != nil {
				return fmt.Errorf("%s token: %w", b.Name(), err)
			}
			ds = append(ds, time.Since(t0))
		}
		fmt.Fprintf(w, " %s %.1f ms;", b.Name(), ms(median(ds)))
		b.Destroy(ctx, dir, id)
	}
	fmt.Fprintln(w)
	return nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }
