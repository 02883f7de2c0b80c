package guestos

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
)

// Downloader fetches guest OS bundles over HTTPS into a download directory
// that survives restarts, so an interrupted download resumes where it
// stopped (HTTP range requests) or, when the server cannot resume,
// restarts from zero. Servers must present a certificate chaining to the
// configured update CAs; plain HTTP and redirects to it are refused.
type Downloader struct {
	dir    string
	client *http.Client
	store  *Store
}

// NewDownloader returns a downloader keeping partial downloads in dir and
// trusting only the CAs in caPEM for servers.
func NewDownloader(dir string, caPEM []byte, store *Store) (*Downloader, error) {
	pool := x509.NewCertPool()
	if len(caPEM) > 0 && !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("update CA file holds no PEM certificate")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	tr := &http.Transport{
		TLSClientConfig:       &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		ResponseHeaderTimeout: 30 * time.Second,
		TLSHandshakeTimeout:   15 * time.Second,
		Proxy:                 http.ProxyFromEnvironment,
	}
	c := &http.Client{Transport: tr, CheckRedirect: func(r *http.Request, via []*http.Request) error {
		if r.URL.Scheme != "https" {
			return fmt.Errorf("redirect to %s refused: only https", r.URL.Scheme)
		}
		if len(via) > 5 {
			return errors.New("too many redirects")
		}
		return nil
	}}
	d := &Downloader{dir: dir, client: c, store: store}
	if len(caPEM) == 0 {
		d.client = nil
	}
	return d, nil
}

func (d *Downloader) slot(base string) string {
	h := sha256.Sum256([]byte(base))
	return filepath.Join(d.dir, hex.EncodeToString(h[:8]))
}

// Fetch downloads the bundle at base (a directory URL holding guestos.conf,
// its .sig and .cert, and the images). The manifest's signature is checked
// before any image is fetched, so an untrusted server cannot make the
// device download gigabytes. It returns the local directory to install.
func (d *Downloader) Fetch(ctx context.Context, base string, progress Progress) (string, error) {
	u, err := url.Parse(base)
	if err != nil || u.Host == "" {
		return "", errdefs.InvalidArgument("guestos install: %q is not a URL", base)
	}
	if u.Scheme != "https" {
		return "", errdefs.InvalidArgument("guestos install: %s:// refused; guest OSes are only downloaded over https", u.Scheme)
	}
	if d.client == nil {
		return "", errdefs.FailedPrecondition("guestos install: no update CA configured (device setting update_ca_file)")
	}
	if u.Path == "" || u.Path[len(u.Path)-1] != '/' {
		u.Path += "/"
	}
	dir := d.slot(u.String())
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	small := map[string]int64{ManifestFile: config.MaxFileSize, ManifestFile + sign.SigSuffix: sign.MaxSignatureSize, ManifestFile + sign.CertSuffix: sign.MaxChainSize}
	files := map[string][]byte{}
	for name, max := range small {
		b, err := d.getSmall(ctx, u.JoinPath(name).String(), max)
		if err != nil {
			return "", err
		}
		files[name] = b
	}
	cfg, _, err := d.store.verifyManifest(filepath.Join(base, ManifestFile), files[ManifestFile], files[ManifestFile+sign.SigSuffix], files[ManifestFile+sign.CertSuffix], time.Now())
	if err != nil {
		return "", err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return "", err
		}
	}
	var total, done uint64
	for _, m := range cfg.GetMounts() {
		total += m.GetImageSize()
	}
	for _, m := range cfg.GetMounts() {
		if err := d.getImage(ctx, u.JoinPath(m.GetImageFile()).String(), filepath.Join(dir, m.GetImageFile()), m.GetImageSize(), func(n uint64) { progress("download", done+n, total) }); err != nil {
			return "", err
		}
		done += m.GetImageSize()
	}
	progress("download", done, total)
	return dir, nil
}

// Done forgets the download of base (after it was installed or refused).
func (d *Downloader) Done(base string) {
	u, err := url.Parse(base)
	if err != nil {
		return
	}
	if u.Path == "" || u.Path[len(u.Path)-1] != '/' {
		u.Path += "/"
	}
	os.RemoveAll(d.slot(u.String()))
}

func (d *Downloader) get(ctx context.Context, u string, from int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if from > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(from, 10)+"-")
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "download")
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent {
		resp.Body.Close()
		return nil, errdefs.Unavailable("download %s: %s", u, resp.Status)
	}
	return resp, nil
}

func (d *Downloader) getSmall(ctx context.Context, u string, max int64) ([]byte, error) {
	resp, err := d.get(ctx, u, 0)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, max+1))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "download %s", u)
	}
	if int64(len(b)) > max {
		return nil, errdefs.InvalidArgument("download %s: larger than %d bytes", u, max)
	}
	return b, nil
}

// getImage downloads u to dst, resuming a partial dst.part.
func (d *Downloader) getImage(ctx context.Context, u, dst string, size uint64, progress func(uint64)) error {
	if st, err := os.Stat(dst); err == nil && uint64(st.Size()) == size {
		return nil
	}
	part := dst + ".part"
	var have int64
	if st, err := os.Stat(part); err == nil {
		have = st.Size()
	}
	if uint64(have) > size {
		os.Remove(part)
		have = 0
	}
	resp, err := d.get(ctx, u, have)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
	if resp.StatusCode == http.StatusOK { // server ignored the range: restart
		flags |= os.O_TRUNC
		have = 0
	}
	f, err := os.OpenFile(part, flags, 0o600)
	if err != nil {
		return err
	}
	cr := &ctxReader{ctx: ctx, r: io.LimitReader(resp.Body, int64(size)-have+1), n: uint64(have), progress: progress}
	n, err := io.Copy(f, cr)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return errdefs.Wrap(errdefs.ErrUnavailable, err, "download %s (interrupted at %d of %d bytes; install again to resume)", u, have+n, size)
	}
	if uint64(have+n) != size {
		os.Remove(part)
		return errdefs.Integrity("download %s: got %d bytes, the signed manifest says %d", u, have+n, size)
	}
	return os.Rename(part, dst)
}
