// Package conventions checks project rules that the compiler does not:
// which packages the off-device tools may link, and that every package
// says what it is in exactly one package doc comment.
package conventions

import (
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/cmlproject/cml"

// daemonPackages are cmld's own: process, mount, namespace, TPM and state
// code. The tools that run off the device or in a build pipeline must not
// link any of them (a verifier that shares the daemon's code shares its
// bugs, and drags in root-only machinery).
var daemonPackages = []string{
	"internal/api", "internal/audit", "internal/container", "internal/daemon", "internal/device",
	"internal/guestos", "internal/oci", "internal/reaper", "internal/rootfs", "internal/seccomp", "internal/tpm",
}

func TestToolsLinkNoDaemonCode(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	for _, tool := range []string{"cmd/cmlverify", "cmd/cmlsign", "cmd/cmlctl"} {
		out, err := exec.Command("go", "list", "-deps", "./../../"+tool).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", tool, err, out)
		}
		deps := map[string]bool{}
		for _, d := range strings.Fields(string(out)) {
			deps[d] = true
		}
		for _, p := range daemonPackages {
			if deps[module+"/"+p] {
				t.Errorf("%s links daemon package %s", tool, p)
			}
		}
		// go-tpm-tools' client package registers SEV/TDX flags globally.
		if deps["github.com/google/go-tpm-tools/client"] {
			t.Errorf("%s links go-tpm-tools/client", tool)
		}
	}
}

func TestEveryPackageHasOneDoc(t *testing.T) {
	root := "../.."
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		name := d.Name()
		if path != root && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") || name == "testdata" || name == "bin") {
			return filepath.SkipDir
		}
		ents, err := os.ReadDir(path)
		if err != nil {
			return err
		}
		fset := token.NewFileSet()
		docs := map[string][]string{} // package name -> files with a doc
		seen := map[string]bool{}
		for _, e := range ents {
			if e.IsDir() || !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
				continue
			}
			f, err := parser.ParseFile(fset, filepath.Join(path, e.Name()), nil, parser.PackageClauseOnly|parser.ParseComments)
			if err != nil {
				t.Errorf("%s: %v", e.Name(), err)
				continue
			}
			seen[f.Name.Name] = true
			if f.Doc != nil {
				docs[f.Name.Name] = append(docs[f.Name.Name], e.Name())
			}
		}
		for pname := range seen {
			if len(docs[pname]) != 1 {
				t.Errorf("package %s (%s) has %d package doc comments %v, want exactly 1", pname, path, len(docs[pname]), docs[pname])
			}
		}
		return nil
	})
}
