package bench

import (
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"

	"github.com/cmlproject/cml/internal/verity"
)

// Verification measures image verification throughput on one file of
// sizeMiB: CML's parallel verity check (what cmld runs before every start)
// against sha256sum and `veritysetup format` of the same file, in the same
// run, each the median of runs passes over a warm page cache.
func Verification(w io.Writer, dir string, sizeMiB, runs int) error {
	img := filepath.Join(dir, "verify.img")
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := 0; i < sizeMiB; i++ {
		rand.Read(buf)
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
	}
	f.Close()
	defer os.Remove(img)
	salt := make([]byte, verity.SaltSize)
	rand.Read(salt)
	r, err := os.Open(img)
	if err != nil {
		return err
	}
	defer r.Close()
	size := int64(sizeMiB) << 20
	tree, err := verity.Build(r, size, salt, 0) // also warms the page cache
	if err != nil {
		return err
	}
	measure := func(fn func() error) (time.Duration, error) {
		var ds []time.Duration
		for i := 0; i < runs; i++ {
			t0 := time.Now()
			if err := fn(); err != nil {
				return 0, err
			}
			ds = append(ds, time.Since(t0))
		}
		return median(ds), nil
	}
	cml, err := measure(func() error { return verity.Check(r, size, salt, tree.Root, nil, 0) })
	if err != nil {
		return err
	}
	one, err := measure(func() error { return verity.Check(r, size, salt, tree.Root, nil, 1) })
	if err != nil {
		return err
	}
	ossl, err := measure(func() error { return exec.Command("openssl", "dgst", "-sha256", img).Run() })
	if err != nil {
		return fmt.Errorf("openssl: %w", err)
	}
	sha, err := measure(func() error { return exec.Command("sha256sum", img).Run() })
	if err != nil {
		return fmt.Errorf("sha256sum: %w", err)
	}
	hashFile := filepath.Join(dir, "verify.hash")
	defer os.Remove(hashFile)
	vs, err := measure(func() error {
		os.Remove(hashFile)
		out, err := exec.Command("veritysetup", "format", img, hashFile).CombinedOutput()
		if err != nil {
			return fmt.Errorf("veritysetup: %v: %s", err, out)
		}
		return nil
	})
	if err != nil {
		return err
	}
	mbps := func(d time.Duration) float64 { return float64(sizeMiB) * 1.048576 / d.Seconds() }
	fmt.Fprintf(w, "image verification, %d MiB file in page cache, median of %d, %d CPUs\n", sizeMiB, runs, runtime.NumCPU())
	fmt.Fprintf(w, "  (c) cmld verity check (parallel)     %7.1f ms  %7.0f MB/s\n", ms(cml), mbps(cml))
	fmt.Fprintf(w, "      same, one core                   %7.1f ms  %7.0f MB/s\n", ms(one), mbps(one))
	fmt.Fprintf(w, "  (d) sha256sum                        %7.1f ms  %7.0f MB/s\n", ms(sha), mbps(sha))
	fmt.Fprintf(w, "      openssl dgst -sha256             %7.1f ms  %7.0f MB/s  (uses the CPU's SHA instructions; sha256sum does not)\n", ms(ossl), mbps(ossl))
	fmt.Fprintf(w, "  (e) veritysetup format               %7.1f ms  %7.0f MB/s\n", ms(vs), mbps(vs))
	fmt.Fprintf(w, "  speed-up c vs d                      %7.2fx  (goal > 1)\n", float64(sha)/float64(cml))
	fmt.Fprintf(w, "  speed-up c vs e                      %7.2fx\n", float64(vs)/float64(cml))
	fmt.Fprintf(w, "  speed-up c vs openssl                %7.2fx\n", float64(ossl)/float64(cml))
	return nil
}
