package verity

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/cmlproject/cml/internal/testutil"
)

var rootLine = regexp.MustCompile(`(?m)^Root hash:\s+([0-9a-f]+)`)

// TestMatchesVeritysetup checks root hashes and hash files against
// cryptsetup's veritysetup, the independent implementation the kernel's
// dm-verity target is used with, at level-boundary sizes.
func TestMatchesVeritysetup(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	dir := t.TempDir()
	salt := make([]byte, SaltSize)
	rand.Read(salt)
	for _, blocks := range []int{1, 2, 127, 128, 129, 128*128 + 1, 3000} {
		data := make([]byte, blocks*BlockSize)
		rand.Read(data)
		img := filepath.Join(dir, "img")
		os.WriteFile(img, data, 0o600)
		tree, err := Build(bytes.NewReader(data), int64(len(data)), salt, 0)
		if err != nil {
			t.Fatal(err)
		}
		ref := filepath.Join(dir, "ref.hash")
		os.Remove(ref)
		out, err := exec.Command("veritysetup", "format", "--salt="+hex.EncodeToString(salt), img, ref).CombinedOutput()
		if err != nil {
			t.Fatalf("veritysetup format: %v\n%s", err, out)
		}
		m := rootLine.FindSubmatch(out)
		if m == nil {
			t.Fatalf("no root hash in %s", out)
		}
		if got := hex.EncodeToString(tree.Root); got != string(m[1]) {
			t.Fatalf("%d blocks: root %s, veritysetup %s", blocks, got, m[1])
		}
		if blocks == 1 {
			continue // one block has no hash levels to compare
		}
		ours := filepath.Join(dir, "ours.hash")
		os.WriteFile(ours, tree.HashFile(), 0o600)
		if out, err := exec.Command("veritysetup", "verify", img, ours, hex.EncodeToString(tree.Root)).CombinedOutput(); err != nil {
			t.Fatalf("%d blocks: veritysetup verify of our hash file: %v\n%s", blocks, err, out)
		}
		theirs, _ := os.ReadFile(ref)
		pt, err := ParseHashFile(theirs)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bytes.Join(pt.Levels, nil), bytes.Join(tree.Levels, nil)) {
			t.Fatalf("%d blocks: hash levels differ from veritysetup's", blocks)
		}
		if HashFileSize(int64(len(data))) != int64(len(tree.HashFile())) {
			t.Fatalf("HashFileSize disagrees")
		}
	}
}

// TestCheckNamesTamperedBlocks flips bytes the way an attacker with write
// access to the image file would, and expects the check to fail naming the
// blocks.
func TestCheckNamesTamperedBlocks(t *testing.T) {
	data := make([]byte, 300*BlockSize)
	rand.Read(data)
	salt := []byte("0123456789abcdef0123456789abcdef")
	tree, err := Build(bytes.NewReader(data), int64(len(data)), salt, 2)
	if err != nil {
		t.Fatal(err)
	}
	hf := tree.HashFile()
	if err := Check(bytes.NewReader(data), int64(len(data)), salt, tree.Root, hf, 0); err != nil {
		t.Fatalf("intact image refused: %v", err)
	}
	bad := bytes.Clone(data)
	bad[17*BlockSize+5] ^= 1
	bad[200*BlockSize] ^= 0x80
	bad[201*BlockSize+4095] ^= 0x80
	err = Check(bytes.NewReader(bad), int64(len(bad)), salt, tree.Root, hf, 0)
	if err == nil || !strings.Contains(err.Error(), "17, 200-201") {
		t.Fatalf("tampered image: %v", err)
	}
	// Without the reference tree the check still fails.
	if err := Check(bytes.NewReader(bad), int64(len(bad)), salt, tree.Root, nil, 0); err == nil {
		t.Fatal("tampered image passed without a reference tree")
	}
	// A reference tree tampered to match the bad data does not help the
	// attacker: it no longer hashes to the signed root.
	bt, _ := Build(bytes.NewReader(bad), int64(len(bad)), salt, 0)
	if err := Check(bytes.NewReader(bad), int64(len(bad)), salt, tree.Root, bt.HashFile(), 0); err == nil {
		t.Fatal("tampered image with matching tampered tree passed")
	}
	// Truncated image.
	if err := Check(bytes.NewReader(data[:len(data)-BlockSize]), int64(len(data)), salt, tree.Root, hf, 0); err == nil {
		t.Fatal("truncated image passed")
	}
	if _, err := Build(bytes.NewReader(data), int64(len(data)-1), salt, 0); err == nil {
		t.Fatal("unaligned size accepted")
	}
}
