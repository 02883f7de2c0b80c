package cmlsign

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/bundle"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/verity"
)

// BuildRequest describes a guest OS bundle to build.
type BuildRequest struct {
	Name, Description, Init string
	Version                 uint64
	InitEnv, InitParam      []string
	MinRAM                  uint32
	// RootFS is the directory to turn into the root image.
	RootFS string
	// FSType is "erofs" (default) or "squashfs".
	FSType string
	// AllRoot makes every file owned by root (for trees built unprivileged).
	AllRoot bool
	// Salt for the verity tree; random when empty.
	Salt []byte
	Out  string
}

// BuildGuestOS builds a signed guest OS bundle in r.Out: root.img, its
// dm-verity hash file root.img.verity, guestos.conf, guestos.conf.sig and
// guestos.conf.cert. It returns the manifest.
func BuildGuestOS(r BuildRequest, key crypto.Signer, chain []*x509.Certificate) (*cmlv1.GuestOSConfig, error) {
	if !config.ValidName(r.Name) {
		return nil, fmt.Errorf("name %q is not a safe identifier", r.Name)
	}
	if r.Version == 0 {
		return nil, fmt.Errorf("version must be at least 1")
	}
	if r.FSType == "" {
		r.FSType = "erofs"
	}
	if r.Init == "" {
		r.Init = "/sbin/init"
	}
	if len(r.Salt) == 0 {
		r.Salt = make([]byte, verity.SaltSize)
		if _, err := rand.Read(r.Salt); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(r.Out, 0o755); err != nil {
		return nil, err
	}
	img := filepath.Join(r.Out, "root.img")
	os.Remove(img)
	if err := makeImage(r, img); err != nil {
		return nil, err
	}
	m, err := describeImage(img, r.Salt)
	if err != nil {
		return nil, err
	}
	m.MountPoint = proto.String("/")
	m.FsType = proto.String(r.FSType)
	g := &cmlv1.GuestOSConfig{
		Name: proto.String(r.Name), Version: proto.Uint64(r.Version), Mounts: []*cmlv1.GuestOSMount{m},
		InitPath: proto.String(r.Init), InitEnv: r.InitEnv, InitParam: r.InitParam,
	}
	if r.Description != "" {
		g.Description = proto.String(r.Description)
	}
	if r.MinRAM != 0 {
		g.MinRamLimit = proto.Uint32(r.MinRAM)
	}
	text, err := prototext.MarshalOptions{Multiline: true}.Marshal(g)
	if err != nil {
		return nil, err
	}
	mpath := filepath.Join(r.Out, bundle.ManifestFile)
	// Check with the daemon's own parser so a bundle that builds installs.
	if _, err := config.ParseGuestOS(mpath, text); err != nil {
		return nil, err
	}
	if err := os.WriteFile(mpath, text, 0o644); err != nil {
		return nil, err
	}
	return g, sign.SignFile(mpath, key, chain)
}

func makeImage(r BuildRequest, img string) error {
	var cmd *exec.Cmd
	switch r.FSType {
	case "erofs":
		args := []string{"--quiet", "-T0"}
		if r.AllRoot {
			args = append(args, "--all-root")
		}
		cmd = exec.Command("mkfs.erofs", append(args, img, r.RootFS)...)
	case "squashfs":
		args := []string{r.RootFS, img, "-noappend", "-quiet", "-no-progress", "-mkfs-time", "0", "-all-time", "0"}
		if r.AllRoot {
			args = append(args, "-all-root")
		}
		cmd = exec.Command("mksquashfs", args...)
	default:
		return fmt.Errorf("fs type %q is not erofs or squashfs", r.FSType)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", cmd.Args[0], err, strings.TrimSpace(string(out)))
	}
	// Pad to whole verity blocks; both filesystems ignore the tail.
	st, err := os.Stat(img)
	if err != nil {
		return err
	}
	if rem := st.Size() % verity.BlockSize; rem != 0 {
		return os.Truncate(img, st.Size()+verity.BlockSize-rem)
	}
	return nil
}

// describeImage hashes img and writes its verity hash file next to it.
func describeImage(img string, salt []byte) (*cmlv1.GuestOSMount, error) {
	f, err := os.Open(img)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	t, err := verity.Build(f, st.Size(), salt, 0)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(img+bundle.HashFileSuffix, t.HashFile(), 0o644); err != nil {
		return nil, err
	}
	return &cmlv1.GuestOSMount{
		ImageFile:      proto.String(filepath.Base(img)),
		ImageSize:      proto.Uint64(uint64(st.Size())),
		ImageSha2_256:  proto.String(hex.EncodeToString(h.Sum(nil))),
		VerityRootHash: proto.String(hex.EncodeToString(t.Root)),
		VeritySalt:     proto.String(hex.EncodeToString(salt)),
	}, nil
}
