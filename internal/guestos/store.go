// Package guestos is the daemon's store of installed guest OSes: read-only
// filesystem images plus their manifest, one directory per name and version.
//
// Install copies a guest OS into the store and checks each image's size and
// SHA-256 against the manifest on the bytes it copied, so what was checked is
// what later runs; the store is writable only by root. Installs are staged
// and renamed into place, so a crash never leaves a half-installed guest OS.
// This package does not check signatures (the trust chain does) and does not
// know which containers use a guest OS: callers check that before Remove.
package guestos

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
)

// ManifestFile is the manifest's file name inside a guest OS directory.
const ManifestFile = "guestos.conf"

const stagingPrefix = ".staging-"

// Store is the guest OS store rooted at a directory.
type Store struct {
	dir string
	mu  sync.Mutex
}

// GuestOS is one installed guest OS.
type GuestOS struct {
	Config *cmlv1.GuestOSConfig
	Dir    string
	Size   uint64
}

// Name returns the guest OS name.
func (g *GuestOS) Name() string { return g.Config.GetName() }

// Version returns the guest OS version.
func (g *GuestOS) Version() uint64 { return g.Config.GetVersion() }

// ImagePath returns the path of the image file of m.
func (g *GuestOS) ImagePath(m *cmlv1.GuestOSMount) string {
	return filepath.Join(g.Dir, m.GetImageFile())
}

// Root returns the root filesystem image ("/" mount).
func (g *GuestOS) Root() *cmlv1.GuestOSMount {
	for _, m := range g.Config.GetMounts() {
		if m.GetMountPoint() == "/" {
			return m
		}
	}
	return nil
}

// Open opens the store at dir, creating it 0700 and removing stale staging
// directories that a crash during an install left behind.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("guest OS store: %w", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("guest OS store: %w", err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), stagingPrefix) {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return nil, fmt.Errorf("guest OS store: remove stale %s: %w", e.Name(), err)
			}
		}
	}
	return &Store{dir: dir}, nil
}

func (s *Store) versionDir(name string, version uint64) string {
	return filepath.Join(s.dir, name, strconv.FormatUint(version, 10))
}

// readBounded reads a regular file (not following a final symlink) of at
// most max bytes.
func readBounded(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, max)
	}
	return b, nil
}

// Install installs the guest OS in srcDir. It returns the installed guest
// OS, or an error and leaves the store unchanged.
func (s *Store) Install(ctx context.Context, srcDir string) (*GuestOS, error) {
	mpath := filepath.Join(srcDir, ManifestFile)
	text, err := readBounded(mpath, config.MaxFileSize)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "guest OS manifest")
	}
	cfg, err := config.ParseGuestOS(mpath, text)
	if err != nil {
		return nil, err
	}
	id := fmt.Sprintf("guestos %s %d", cfg.GetName(), cfg.GetVersion())

	s.mu.Lock()
	defer s.mu.Unlock()
	final := s.versionDir(cfg.GetName(), cfg.GetVersion())
	if _, err := os.Lstat(final); err == nil {
		return nil, errdefs.AlreadyExists("%s is already installed", id)
	}
	stage, err := os.MkdirTemp(s.dir, stagingPrefix)
	if err != nil {
		return nil, fmt.Errorf("%s: stage: %w", id, err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(stage)
		}
	}()
	var total uint64
	for _, m := range cfg.GetMounts() {
		if err := copyVerified(ctx, filepath.Join(srcDir, m.GetImageFile()), filepath.Join(stage, m.GetImageFile()), m); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
		total += m.GetImageSize()
	}
	if err := atomicfile.Write(filepath.Join(stage, ManifestFile), text, 0o600); err != nil {
		return nil, fmt.Errorf("%s: %w", id, err)
	}
	if err := os.Chmod(stage, 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		return nil, err
	}
	if err := os.Rename(stage, final); err != nil {
		return nil, fmt.Errorf("%s: install: %w", id, err)
	}
	syncDir(filepath.Dir(final))
	ok = true
	return &GuestOS{Config: cfg, Dir: final, Size: total}, nil
}

// copyVerified copies src to dst, checking size and SHA-256 on the copied
// bytes; the destination is what later runs, so nobody can swap the source
// between check and use.
func copyVerified(ctx context.Context, src, dst string, m *cmlv1.GuestOSMount) error {
	in, err := os.OpenFile(src, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "image %s", m.GetImageFile())
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return errdefs.InvalidArgument("image %s: not a regular file", m.GetImageFile())
	}
	if uint64(st.Size()) != m.GetImageSize() {
		return errdefs.Integrity("image %s: size %d does not match the manifest's %d", m.GetImageFile(), st.Size(), m.GetImageSize())
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return err
	}
	defer out.Close()
	h := sha256.New()
	// Read one byte past the size to notice a file that grew meanwhile.
	n, err := io.Copy(io.MultiWriter(out, h), &ctxReader{ctx: ctx, r: io.LimitReader(in, int64(m.GetImageSize())+1)})
	if err != nil {
		return fmt.Errorf("image %s: copy: %w", m.GetImageFile(), err)
	}
	if uint64(n) != m.GetImageSize() {
		return errdefs.Integrity("image %s: size %d does not match the manifest's %d", m.GetImageFile(), n, m.GetImageSize())
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != m.GetImageSha2_256() {
		return errdefs.Integrity("image %s: SHA-256 %s does not match the manifest's %s", m.GetImageFile(), got, m.GetImageSha2_256())
	}
	return out.Sync()
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// load reads an installed guest OS from its store directory.
func (s *Store) load(name string, version uint64) (*GuestOS, error) {
	dir := s.versionDir(name, version)
	text, err := readBounded(filepath.Join(dir, ManifestFile), config.MaxFileSize)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errdefs.NotFound("guestos %s %d is not installed", name, version)
		}
		return nil, err
	}
	cfg, err := config.ParseGuestOS(filepath.Join(dir, ManifestFile), text)
	if err != nil {
		return nil, err
	}
	if cfg.GetName() != name || cfg.GetVersion() != version {
		return nil, errdefs.Integrity("guestos %s %d: manifest names %s %d", name, version, cfg.GetName(), cfg.GetVersion())
	}
	var total uint64
	for _, m := range cfg.GetMounts() {
		total += m.GetImageSize()
	}
	return &GuestOS{Config: cfg, Dir: dir, Size: total}, nil
}

// Get returns guest OS name at version; version 0 selects the highest.
func (s *Store) Get(name string, version uint64) (*GuestOS, error) {
	if !config.ValidName(name) {
		return nil, errdefs.InvalidArgument("guest OS name %q is not a safe identifier", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if version == 0 {
		vs := s.versions(name)
		if len(vs) == 0 {
			return nil, errdefs.NotFound("guestos %s is not installed", name)
		}
		version = vs[len(vs)-1]
	}
	return s.load(name, version)
}

// versions lists the installed versions of name, ascending.
func (s *Store) versions(name string) []uint64 {
	ents, err := os.ReadDir(filepath.Join(s.dir, name))
	if err != nil {
		return nil
	}
	var vs []uint64
	for _, e := range ents {
		if v, err := strconv.ParseUint(e.Name(), 10, 64); err == nil && e.IsDir() {
			vs = append(vs, v)
		}
	}
	sort.Slice(vs, func(i, j int) bool { return vs[i] < vs[j] })
	return vs
}

// List returns all installed guest OSes, by name then version.
func (s *Store) List() ([]*GuestOS, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []*GuestOS
	for _, e := range ents {
		if !e.IsDir() || !config.ValidName(e.Name()) {
			continue
		}
		for _, v := range s.versions(e.Name()) {
			g, err := s.load(e.Name(), v)
			if err != nil {
				return nil, err
			}
			out = append(out, g)
		}
	}
	return out, nil
}

// Remove deletes guest OS name at version. The caller makes sure no
// container uses it.
func (s *Store) Remove(name string, version uint64) error {
	if !config.ValidName(name) {
		return errdefs.InvalidArgument("guest OS name %q is not a safe identifier", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := s.versionDir(name, version)
	if _, err := os.Lstat(dir); err != nil {
		return errdefs.NotFound("guestos %s %d is not installed", name, version)
	}
	// Rename first so a crash mid-removal leaves a staging dir, which Open
	// sweeps, rather than a half-deleted guest OS.
	tmp, err := os.MkdirTemp(s.dir, stagingPrefix)
	if err != nil {
		return err
	}
	if err := os.Rename(dir, filepath.Join(tmp, "old")); err != nil {
		os.Remove(tmp)
		return err
	}
	os.Remove(filepath.Join(s.dir, name)) // only succeeds when empty
	return os.RemoveAll(tmp)
}
