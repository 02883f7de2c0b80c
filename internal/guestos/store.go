// Package guestos is the daemon's store of installed guest OSes: read-only
// filesystem images plus their signed manifest, one directory per name and
// version.
//
// Install accepts a guest OS only when its manifest's signature verifies
// against the trust store (TSF-UPDATE) and its version is not older than the
// highest ever installed under that name (rollback protection; the highest
// versions persist in versions.json even after removal). It copies each
// image into the store and checks size, SHA-256 and dm-verity root hash on
// the bytes it copied, so what was checked is what later runs; the store is
// writable only by root. Installs are staged and renamed into place, so a
// crash never leaves a half-installed guest OS. Check repeats signature and
// verity verification before every start (TSF-INIT, APS-02).
//
// The package does not know which containers use a guest OS: callers check
// that before Remove.
package guestos

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/bundle"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/safefile"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/trust"
	"github.com/cmlproject/cml/internal/verity"
)

// ManifestFile is the manifest's file name inside a guest OS directory;
// its signature and the signer's chain are ManifestFile+".sig" and ".cert".
const ManifestFile = bundle.ManifestFile

// HashFileSuffix names an image's dm-verity hash file (image + suffix).
const HashFileSuffix = bundle.HashFileSuffix

const (
	stagingPrefix = ".staging-"
	versionsFile  = "versions.json"
	installFile   = "install.json"
)

// Verifier checks a detached signature and its signer chain.
type Verifier interface {
	Verify(msg, sig, chainPEM []byte, at time.Time) (trust.Result, error)
}

// Options configure a Store.
type Options struct {
	// Trust verifies manifest signatures; required.
	Trust Verifier
	// LocallySignedImages accepts guest OSes signed under an owner CA.
	LocallySignedImages bool
	// DMVerity maps images through dm-verity at start instead of checking
	// them in full (hosts with device-mapper).
	DMVerity bool
	// Workers hash image blocks in parallel; 0 = one per CPU.
	Workers int
	Now     func() time.Time
	// Counter is a second, tamper-resistant copy of the highest versions
	// (the TPM's NV rollback table); nil keeps them in versions.json only.
	Counter Counter
}

// Counter records the highest version of each guest OS somewhere a restore
// of the state directory cannot reach.
type Counter interface {
	Highest(name string) uint64
	Raise(name string, version uint64) error
}

// Store is the guest OS store rooted at a directory.
type Store struct {
	dir     string
	o       Options
	mu      sync.Mutex // guards highest and installing; never held across image I/O
	highest map[string]uint64
	// installing holds "name/version" of installs copying their images.
	installing map[string]bool
}

// GuestOS is one installed guest OS.
type GuestOS struct {
	Config *cmlv1.GuestOSConfig
	Dir    string
	Size   uint64
	// Installed records when and under whose signature it was accepted.
	Installed InstallRecord
	manifest  []byte // the exact bytes Config was parsed from
}

// InstallRecord is what the store remembers about an install.
type InstallRecord struct {
	Time   time.Time        `json:"time"`
	Level  cmlv1.TrustLevel `json:"level"`
	Signer string           `json:"signer"`
	Root   string           `json:"root"`
}

// Progress reports install progress: phase, bytes done of total.
type Progress func(phase string, done, total uint64)

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
func Open(dir string, o Options) (*Store, error) {
	if o.Trust == nil {
		return nil, errors.New("guest OS store: no trust store")
	}
	if o.Now == nil {
		o.Now = time.Now
	}
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
	s := &Store{dir: dir, o: o, highest: map[string]uint64{}}
	if b, err := os.ReadFile(filepath.Join(dir, versionsFile)); err == nil {
		if err := json.Unmarshal(b, &s.highest); err != nil {
			return nil, fmt.Errorf("guest OS store: %s: %w", versionsFile, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("guest OS store: %w", err)
	}
	// Installed versions count too (a store from before versions.json
	// existed). An install that crashed after recording its version but
	// before the rename is harmless: that version may be installed again.
	for _, e := range ents {
		if e.IsDir() && config.ValidName(e.Name()) {
			if vs := s.versions(e.Name()); len(vs) > 0 && vs[len(vs)-1] > s.highest[e.Name()] {
				s.highest[e.Name()] = vs[len(vs)-1]
			}
		}
	}
	// A store from before the device had a Counter brings its versions in.
	if o.Counter != nil {
		for name, v := range s.highest {
			if err := o.Counter.Raise(name, v); err != nil {
				return nil, fmt.Errorf("guest OS store: rollback counter: %w", err)
			}
		}
	}
	return s, nil
}

// Highest returns the highest version of name ever installed.
func (s *Store) Highest(name string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.highestLocked(name)
}

// highestLocked is the higher of versions.json's and the Counter's value:
// an old versions.json put back cannot lower it.
func (s *Store) highestLocked(name string) uint64 {
	h := s.highest[name]
	if s.o.Counter != nil {
		h = max(h, s.o.Counter.Highest(name))
	}
	return h
}

func (s *Store) versionDir(name string, version uint64) string {
	return filepath.Join(s.dir, name, strconv.FormatUint(version, 10))
}

// Install installs the guest OS in srcDir: manifest, its signature and
// chain, and the images it names. It returns the installed guest OS, or an
// error and leaves the store unchanged.
func (s *Store) Install(ctx context.Context, srcDir string, progress Progress) (*GuestOS, error) {
	if progress == nil {
		progress = func(string, uint64, uint64) {}
	}
	mpath := filepath.Join(srcDir, ManifestFile)
	text, err := safefile.ReadFile(mpath, config.MaxFileSize)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "guest OS manifest")
	}
	sig, err := safefile.ReadFile(mpath+sign.SigSuffix, sign.MaxSignatureSize)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity, err, "guest OS manifest signature")
	}
	chain, err := safefile.ReadFile(mpath+sign.CertSuffix, sign.MaxChainSize)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrIntegrity, err, "guest OS signer certificate")
	}
	now := s.o.Now()
	cfg, res, err := s.verifyManifest(mpath, text, sig, chain, now)
	if err != nil {
		return nil, err
	}
	id := fmt.Sprintf("guestos %s %d", cfg.GetName(), cfg.GetVersion())

	// The store lock is held only to reserve the version and to commit:
	// copying and hashing gigabytes must not stall starts, lists and
	// other installs.
	final := s.versionDir(cfg.GetName(), cfg.GetVersion())
	// A client that lost its connection retries: the identical signed
	// manifest already installed is success, not an error. (Its images
	// were verified at that install and are verified before every start.)
	if g, err := s.load(cfg.GetName(), cfg.GetVersion()); err == nil && bytes.Equal(g.manifest, text) {
		return g, nil
	}
	if err := s.reserve(id, cfg); err != nil {
		return nil, err
	}
	defer s.unreserve(cfg)
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
	var total, done uint64
	for _, m := range cfg.GetMounts() {
		total += m.GetImageSize()
	}
	for _, m := range cfg.GetMounts() {
		dst := filepath.Join(stage, m.GetImageFile())
		if err := copyVerified(ctx, filepath.Join(srcDir, m.GetImageFile()), dst, m, func(n uint64) { progress("copy", done+n, total) }); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
		done += m.GetImageSize()
		progress("verify", done, total)
		hf, err := s.buildHashFile(dst, m)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
		if err := atomicfile.Write(dst+HashFileSuffix, hf, 0o400); err != nil {
			return nil, err
		}
	}
	rec, _ := json.Marshal(InstallRecord{Time: now.UTC(), Level: res.Level, Signer: res.Signer, Root: res.Root})
	for name, b := range map[string][]byte{ManifestFile: text, ManifestFile + sign.SigSuffix: sig, ManifestFile + sign.CertSuffix: chain, installFile: rec} {
		if err := atomicfile.Write(filepath.Join(stage, name), b, 0o400); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
	}
	if err := os.Chmod(stage, 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Checked again at commit: an install of a higher version may have
	// finished meanwhile.
	if h := s.highestLocked(cfg.GetName()); cfg.GetVersion() < h {
		return nil, errdefs.FailedPrecondition("%s is older than version %d installed before (rollback protection)", id, h)
	}
	if s.o.Counter != nil {
		if err := s.o.Counter.Raise(cfg.GetName(), cfg.GetVersion()); err != nil {
			return nil, fmt.Errorf("%s: TPM rollback counter: %w", id, err)
		}
	}
	if cfg.GetVersion() > s.highest[cfg.GetName()] {
		s.highest[cfg.GetName()] = cfg.GetVersion()
		if err := s.saveHighest(); err != nil {
			return nil, fmt.Errorf("%s: %w", id, err)
		}
	}
	if err := os.Rename(stage, final); err != nil {
		return nil, fmt.Errorf("%s: install: %w", id, err)
	}
	atomicfile.SyncDir(filepath.Dir(final))
	ok = true
	return &GuestOS{Config: cfg, Dir: final, Size: total, Installed: InstallRecord{Time: now.UTC(), Level: res.Level, Signer: res.Signer, Root: res.Root}, manifest: text}, nil
}

// reserve claims name and version for an install in flight, refusing one
// that is installed, being installed, or older than the highest version.
func (s *Store) reserve(id string, cfg *cmlv1.GuestOSConfig) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := fmt.Sprintf("%s/%d", cfg.GetName(), cfg.GetVersion())
	if _, err := os.Lstat(s.versionDir(cfg.GetName(), cfg.GetVersion())); err == nil || s.installing[key] {
		return errdefs.AlreadyExists("%s is already installed", id)
	}
	// verifyManifest checked this before the lock; two installs racing
	// past it are caught here.
	if h := s.highestLocked(cfg.GetName()); cfg.GetVersion() < h {
		return errdefs.FailedPrecondition("%s is older than version %d installed before (rollback protection)", id, h)
	}
	if s.installing == nil {
		s.installing = map[string]bool{}
	}
	s.installing[key] = true
	return nil
}

func (s *Store) unreserve(cfg *cmlv1.GuestOSConfig) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.installing, fmt.Sprintf("%s/%d", cfg.GetName(), cfg.GetVersion()))
}

// verifyManifest checks a manifest's signature and the device's policy
// for it, then parses it and applies the rollback check.
func (s *Store) verifyManifest(source string, text, sig, chain []byte, at time.Time) (*cmlv1.GuestOSConfig, trust.Result, error) {
	res, err := s.o.Trust.Verify(text, sig, chain, at)
	if err != nil {
		return nil, res, fmt.Errorf("guest OS manifest: %w", err)
	}
	if err := s.allowed(res); err != nil {
		return nil, res, err
	}
	cfg, err := config.ParseGuestOS(source, text)
	if err != nil {
		return nil, res, err
	}
	id := fmt.Sprintf("guestos %s %d", cfg.GetName(), cfg.GetVersion())
	for _, m := range cfg.GetMounts() {
		if m.GetVerityRootHash() == "" {
			return nil, res, errdefs.InvalidArgument("%s: image %s has no verity_root_hash", id, m.GetImageFile())
		}
	}
	if h := s.Highest(cfg.GetName()); cfg.GetVersion() < h {
		return nil, res, errdefs.FailedPrecondition("%s is older than version %d installed before (rollback protection)", id, h)
	}
	return cfg, res, nil
}

func (s *Store) allowed(res trust.Result) error {
	if res.Level == cmlv1.TrustLevel_LOCALLY_SIGNED && !s.o.LocallySignedImages {
		return errdefs.Integrity("guest OS signed by %q under owner CA %q: locally signed images are off (device setting locally_signed_images)", res.Signer, res.Root)
	}
	return nil
}

func (s *Store) saveHighest() error {
	b, _ := json.Marshal(s.highest)
	return atomicfile.Write(filepath.Join(s.dir, versionsFile), b, 0o600)
}

// buildHashFile checks the image at path against m's verity root hash and
// returns its hash file.
func (s *Store) buildHashFile(path string, m *cmlv1.GuestOSMount) ([]byte, error) {
	salt, root, err := verityParams(m)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	t, err := verity.Build(f, int64(m.GetImageSize()), salt, s.o.Workers)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", m.GetImageFile(), err)
	}
	if !bytes.Equal(t.Root, root) {
		return nil, errdefs.Integrity("image %s: verity root hash %x does not match the manifest's %s", m.GetImageFile(), t.Root, m.GetVerityRootHash())
	}
	return t.HashFile(), nil
}

func verityParams(m *cmlv1.GuestOSMount) (salt, root []byte, err error) {
	salt, err1 := hex.DecodeString(m.GetVeritySalt())
	root, err2 := hex.DecodeString(m.GetVerityRootHash())
	if err1 != nil || err2 != nil || len(root) != 32 {
		return nil, nil, errdefs.InvalidArgument("image %s: verity_root_hash/verity_salt are not hex", m.GetImageFile())
	}
	return salt, root, nil
}

// Check re-verifies an installed guest OS before a start: the manifest's
// signature against the current trust store (a removed CA or a revoked
// signer stops it, an expired one does not), then every image against its
// signed verity root hash, hashing on all cores. It returns the open root
// image, whose bytes were the ones checked: mount it through
// /proc/self/fd/<fd> and close it after.
func (s *Store) Check(ctx context.Context, g *GuestOS) (*os.File, error) {
	id := fmt.Sprintf("guestos %s %d", g.Name(), g.Version())
	// The manifest's signature and the images' hash trees are checked at
	// once; an image is used only when both hold (the root hash it is
	// compared with comes from the manifest, which counts only verified).
	manifest := make(chan error, 1)
	go func() { manifest <- s.checkManifest(g) }()
	var rootImg *os.File
	var ierr error
	for _, m := range g.Config.GetMounts() {
		f, err := s.checkImage(g, m)
		if err != nil {
			ierr = fmt.Errorf("%s: %w", id, err)
			break
		}
		if m.GetMountPoint() == "/" {
			rootImg = f
		} else {
			f.Close()
		}
	}
	err := <-manifest
	if err == nil {
		err = ierr
	}
	if err != nil {
		if rootImg != nil {
			rootImg.Close()
		}
		return nil, err
	}
	return rootImg, nil
}

// checkManifest re-verifies the installed manifest's signature at its
// install time against the current trust store and policy.
func (s *Store) checkManifest(g *GuestOS) error {
	id := fmt.Sprintf("guestos %s %d", g.Name(), g.Version())
	mpath := filepath.Join(g.Dir, ManifestFile)
	sig, err1 := safefile.ReadFile(mpath+sign.SigSuffix, sign.MaxSignatureSize)
	chain, err2 := safefile.ReadFile(mpath+sign.CertSuffix, sign.MaxChainSize)
	if err := errors.Join(err1, err2); err != nil {
		return errdefs.Wrap(errdefs.ErrIntegrity, err, "%s: manifest", id)
	}
	// g.manifest is what Config was parsed from when g was loaded (each
	// Get reads it afresh), so verifying it verifies what runs.
	res, err := s.o.Trust.Verify(g.manifest, sig, chain, g.Installed.Time)
	if err != nil {
		return fmt.Errorf("%s: manifest: %w", id, err)
	}
	if err := s.allowed(res); err != nil {
		return fmt.Errorf("%s: %w", id, err)
	}
	return nil
}

// DMVerityAvailable reports whether this host can mount images through
// dm-verity: the kernel answers device-mapper's version request, and
// veritysetup is installed. The control node alone proves nothing: tools
// create /dev/mapper/control on kernels without device-mapper, and taking
// that for device-mapper would turn an environment problem into an
// integrity alarm at every start.
func DMVerityAvailable() bool {
	if _, err := DeviceMapperVersion(); err != nil {
		return false
	}
	_, err := exec.LookPath("veritysetup")
	return err == nil
}

// DeviceMapperVersion asks the kernel for device-mapper's ioctl interface
// version (DM_VERSION on /dev/mapper/control).
func DeviceMapperVersion() (string, error) {
	f, err := os.OpenFile("/dev/mapper/control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("device-mapper: %w", err)
	}
	defer f.Close()
	// struct dm_ioctl (312 bytes): version[3], data_size, data_start, ...
	const size = 312
	var buf [size]byte
	binary.NativeEndian.PutUint32(buf[0:], 4) // interface major version we speak
	binary.NativeEndian.PutUint32(buf[12:], size)
	binary.NativeEndian.PutUint32(buf[16:], size)
	const dmVersion = 0xc138fd00 // _IOWR(0xfd, 0, struct dm_ioctl)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), dmVersion, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return "", fmt.Errorf("device-mapper: %w", errno)
	}
	return fmt.Sprintf("%d.%d.%d", binary.NativeEndian.Uint32(buf[0:]), binary.NativeEndian.Uint32(buf[4:]), binary.NativeEndian.Uint32(buf[8:])), nil
}

// UsesDMVerity reports whether starts map images through dm-verity.
func (s *Store) UsesDMVerity() bool { return s.o.DMVerity }

// OpenVerity re-verifies the manifest and maps the root image through
// dm-verity as /dev/mapper/<name>: the kernel then checks every block
// against the signed root hash as it is read, so a start does not read the
// whole image, and a block changed later fails with EIO instead of being
// served. Close it with CloseVerity.
func (s *Store) OpenVerity(ctx context.Context, g *GuestOS, name string) (string, error) {
	if err := s.checkManifest(g); err != nil {
		return "", err
	}
	m := g.Root()
	if _, _, err := verityParams(m); err != nil {
		return "", err
	}
	CloseVerity(name)
	img := g.ImagePath(m)
	if st, err := os.Stat(img); err != nil || uint64(st.Size()) != m.GetImageSize() {
		return "", errdefs.Integrity("guestos %s %d: image %s is missing or its size changed", g.Name(), g.Version(), m.GetImageFile())
	}
	out, err := exec.CommandContext(ctx, "veritysetup", "open", img, name, img+HashFileSuffix, m.GetVerityRootHash()).CombinedOutput()
	if err != nil {
		return "", errdefs.Integrity("guestos %s %d: image %s: dm-verity refused it: %s", g.Name(), g.Version(), m.GetImageFile(), strings.TrimSpace(string(out)))
	}
	return "/dev/mapper/" + name, nil
}

// CloseVerity removes the dm-verity mapping name once nothing uses it.
func CloseVerity(name string) {
	if _, err := os.Stat("/dev/mapper/" + name); err == nil {
		exec.Command("veritysetup", "close", "--deferred", name).Run()
	}
}

func (s *Store) checkImage(g *GuestOS, m *cmlv1.GuestOSMount) (*os.File, error) {
	salt, root, err := verityParams(m)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(g.ImagePath(m), os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, errdefs.Integrity("image %s: %v", m.GetImageFile(), err)
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || uint64(st.Size()) != m.GetImageSize() {
		f.Close()
		return nil, errdefs.Integrity("image %s: missing, not a regular file, or its size changed", m.GetImageFile())
	}
	ref, _ := safefile.ReadFile(g.ImagePath(m)+HashFileSuffix, verity.HashFileSize(int64(m.GetImageSize())))
	if err := verity.Check(f, st.Size(), salt, root, ref, s.o.Workers); err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s: %w", m.GetImageFile(), err)
	}
	return f, nil
}

// copyVerified copies src to dst, checking size and SHA-256 on the copied
// bytes; the destination is what later runs, so nobody can swap the source
// between check and use.
func copyVerified(ctx context.Context, src, dst string, m *cmlv1.GuestOSMount, progress func(uint64)) error {
	in, st, err := safefile.Open(src)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "image %s", m.GetImageFile())
	}
	defer in.Close()
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
	n, err := io.Copy(io.MultiWriter(out, h), &ctxReader{ctx: ctx, r: io.LimitReader(in, int64(m.GetImageSize())+1), progress: progress})
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
	ctx      context.Context
	r        io.Reader
	n        uint64
	progress func(uint64)
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := c.r.Read(p)
	if c.n/(16<<20) != (c.n+uint64(n))/(16<<20) && c.progress != nil {
		c.progress(c.n + uint64(n))
	}
	c.n += uint64(n)
	return n, err
}

// load reads an installed guest OS from its store directory.
func (s *Store) load(name string, version uint64) (*GuestOS, error) {
	dir := s.versionDir(name, version)
	text, err := safefile.ReadFile(filepath.Join(dir, ManifestFile), config.MaxFileSize)
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
	g := &GuestOS{Config: cfg, Dir: dir, Size: total, manifest: text}
	b, err := safefile.ReadFile(filepath.Join(dir, installFile), 4096)
	if err != nil || json.Unmarshal(b, &g.Installed) != nil {
		return nil, errdefs.Integrity("guestos %s %d: install record is missing or damaged", name, version)
	}
	return g, nil
}

// Get returns guest OS name at version; version 0 selects the highest.
func (s *Store) Get(name string, version uint64) (*GuestOS, error) {
	if !config.ValidName(name) {
		return nil, errdefs.InvalidArgument("guest OS name %q is not a safe identifier", name)
	}
	// No lock: version directories appear and go by rename, so a reader
	// sees a whole guest OS or none, and waits for no install.
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
			if errors.Is(err, errdefs.ErrNotFound) {
				continue // removed meanwhile
			}
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
	dir := s.versionDir(name, version)
	if _, err := os.Lstat(dir); err != nil {
		s.mu.Unlock()
		return errdefs.NotFound("guestos %s %d is not installed", name, version)
	}
	// Rename first so a crash mid-removal leaves a staging dir, which Open
	// sweeps, rather than a half-deleted guest OS.
	tmp, err := os.MkdirTemp(s.dir, stagingPrefix)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if err := os.Rename(dir, filepath.Join(tmp, "old")); err != nil {
		s.mu.Unlock()
		os.Remove(tmp)
		return err
	}
	os.Remove(filepath.Join(s.dir, name)) // only succeeds when empty
	s.mu.Unlock()
	return os.RemoveAll(tmp)
}
