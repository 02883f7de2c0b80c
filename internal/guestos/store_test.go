package guestos

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/cmlproject/cml/internal/errdefs"
)

// source writes a guest OS directory with one fake image.
func source(t *testing.T, version int, img []byte, manifestSize int) string {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "root.img"), img, 0o644)
	sum := sha256.Sum256(img)
	m := fmt.Sprintf("name: \"g\"\nversion: %d\nmounts { image_file: \"root.img\" mount_point: \"/\" fs_type: \"erofs\" image_size: %d image_sha2_256: %q }\n",
		version, manifestSize, hex.EncodeToString(sum[:]))
	os.WriteFile(filepath.Join(dir, ManifestFile), []byte(m), 0o644)
	return dir
}

func TestInstallChecksAndLeavesNothingOnFailure(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	img := []byte("an image of 32 bytes, not more..")
	ctx := context.Background()

	bad := source(t, 1, img, len(img))
	os.WriteFile(filepath.Join(bad, "root.img"), append([]byte("X"), img[1:]...), 0o644) // flipped byte
	if _, err := s.Install(ctx, bad); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("tampered image: err = %v, want integrity violation", err)
	}
	if _, err := s.Install(ctx, source(t, 1, img, len(img)+1)); !errors.Is(err, errdefs.ErrIntegrity) {
		t.Errorf("size mismatch: err = %v", err)
	}
	if ents, _ := os.ReadDir(s.dir); len(ents) != 0 {
		t.Errorf("failed installs left %d entries in the store", len(ents))
	}

	if _, err := s.Install(ctx, source(t, 1, img, len(img))); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Install(ctx, source(t, 1, img, len(img))); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("reinstall: err = %v", err)
	}
	if _, err := s.Install(ctx, source(t, 2, img, len(img))); err != nil {
		t.Fatal(err)
	}
	g, err := s.Get("g", 0)
	if err != nil || g.Version() != 2 {
		t.Fatalf("highest = %v, %v", g, err)
	}
	if err := s.Remove("g", 2); err != nil {
		t.Fatal(err)
	}
	if g, _ := s.Get("g", 0); g == nil || g.Version() != 1 {
		t.Errorf("after removing 2, highest = %v", g)
	}
	if _, err := s.Get("../etc", 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("path name accepted: %v", err)
	}
}

func TestOpenSweepsStaleStaging(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, stagingPrefix+"123", "x"), 0o700)
	if _, err := Open(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, stagingPrefix+"123")); !os.IsNotExist(err) {
		t.Error("stale staging directory survived Open (a crash mid-install would leave it)")
	}
}
