package oci

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// The spec is the isolation policy: each case's full spec is compared
// with a reviewed golden file (rewrite with go test -update after a
// deliberate change, and review the diff).
func TestSpecGolden(t *testing.T) {
	base := SpecOptions{
		Hostname: "web", Rootfs: "/run/cml/containers/ID/rootfs", Args: []string{"/sbin/init"},
		Env: []string{"PATH=/bin", "container=cml"}, PidsLimit: 1024, Capabilities: DefaultCapabilities,
		CgroupsPath: "/cml/ID",
	}
	userns := base
	userns.UIDBase, userns.IDCount, userns.NetNS = 165536, 65536, true
	limits := base
	limits.MemoryBytes, limits.NoSwap, limits.CPUs, limits.CPUWeight, limits.CPUQuotaPct = 32<<20, true, "0-1", 200, 50
	limits.ReadonlyRootfs = true
	limits.Devices = []Device{{Type: "c", Major: 4, Minor: 64, Access: "rw", Path: "/dev/ttyS0", Mode: 0o660}, {Type: "c", Major: 188, Minor: -1, Access: "rwm"}}
	limits.Mounts = []Mount{{Source: "/var/lib/cml/containers/ID/volumes/data", Destination: "/data"}, {Source: "/srv/ro", Destination: "/ro", ReadOnly: true}}
	netns := userns
	netns.NetNSPath = "/run/cml/netns/ID"
	for name, o := range map[string]SpecOptions{"minimal": base, "userns": userns, "limits": limits, "netns-path": netns} {
		t.Run(name, func(t *testing.T) {
			got, err := json.MarshalIndent(Spec(o), "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", name+".json")
			if *update {
				if err := os.WriteFile(golden, append(got, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if d := cmp.Diff(string(want), string(got)+"\n"); d != "" {
				t.Errorf("spec differs from %s (-want +got):\n%s", golden, d)
			}
		})
	}
}
