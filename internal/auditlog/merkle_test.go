package auditlog

import (
	"crypto/sha256"
	"fmt"
	"testing"
)

// rootOf is the RFC 6962 definition, recursive, as the reference.
func rootOf(leaves [][32]byte) [32]byte {
	switch len(leaves) {
	case 0:
		return sha256.Sum256(nil)
	case 1:
		return leaves[0]
	}
	k := 1
	for k*2 < len(leaves) {
		k *= 2
	}
	return nodeHash(rootOf(leaves[:k]), rootOf(leaves[k:]))
}

func TestTreeMatchesRFC6962(t *testing.T) {
	var tr Tree
	var leaves [][32]byte
	for i := 0; i < 70; i++ {
		if tr.Root() != rootOf(leaves) {
			t.Fatalf("size %d: root differs", i)
		}
		l := LeafHash([]byte(fmt.Sprint(i)))
		leaves = append(leaves, l)
		tr.Append(l)
	}
	// RFC 6962's empty-tree root.
	if fmt.Sprintf("%x", (&Tree{}).Root()) != "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" {
		t.Error("empty root")
	}
}
