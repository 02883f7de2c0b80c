package cmlsign

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzExtractTar: OCI layers come from outside the build pipeline. Any
// tar may be refused; none may write outside the root it is unpacked
// into (through "..", absolute names, symlinks or hard links).
func FuzzExtractTar(f *testing.F) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "etc/passwd", Typeflag: tar.TypeReg, Mode: 0o644, Size: 4})
	tw.Write([]byte("root"))
	tw.WriteHeader(&tar.Header{Name: "etc/link", Typeflag: tar.TypeSymlink, Linkname: "../../outside"})
	tw.WriteHeader(&tar.Header{Name: "etc/.wh.old", Typeflag: tar.TypeReg})
	tw.Close()
	f.Add(b.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		base := t.TempDir()
		root := filepath.Join(base, "root")
		os.Mkdir(root, 0o755)
		extractTar(tar.NewReader(bytes.NewReader(data)), root, true)
		ents, _ := os.ReadDir(base)
		for _, e := range ents {
			if e.Name() != "root" {
				t.Fatalf("extraction wrote %s outside its root", e.Name())
			}
		}
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type()&os.ModeSymlink != 0 {
				// Links may point anywhere as text; following them is the
				// extractor's concern, checked by writing nothing outside.
				return nil
			}
			if err == nil && !strings.HasPrefix(p, root) {
				t.Fatalf("%s outside the root", p)
			}
			return nil
		})
	})
}
