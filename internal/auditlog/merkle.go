package auditlog

import "crypto/sha256"

// RFC 6962 hashing: a leaf is SHA-256(0x00 || data), an inner node
// SHA-256(0x01 || left || right); the tree of n leaves splits at the
// largest power of two below n.

// LeafHash is the RFC 6962 hash of one log entry.
func LeafHash(data []byte) [32]byte {
	h := sha256.New()
	h.Write([]byte{0})
	h.Write(data)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

func nodeHash(l, r [32]byte) [32]byte {
	h := sha256.New()
	h.Write([]byte{1})
	h.Write(l[:])
	h.Write(r[:])
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// Tree is an append-only Merkle tree kept as the roots of its perfect
// subtrees (one per set bit of the size): O(log n) memory.
type Tree struct {
	size  uint64
	peaks [][32]byte // from the largest subtree to the smallest
}

// Append adds a leaf hash.
func (t *Tree) Append(leaf [32]byte) {
	t.peaks = append(t.peaks, leaf)
	// Merge equal-sized subtrees: as many as trailing ones in the size.
	for s := t.size; s&1 == 1; s >>= 1 {
		n := len(t.peaks)
		t.peaks = append(t.peaks[:n-2], nodeHash(t.peaks[n-2], t.peaks[n-1]))
	}
	t.size++
}

// Size is the number of leaves.
func (t *Tree) Size() uint64 { return t.size }

// Root is the RFC 6962 root hash (of the empty tree: SHA-256 of nothing).
func (t *Tree) Root() [32]byte {
	if len(t.peaks) == 0 {
		return sha256.Sum256(nil)
	}
	r := t.peaks[len(t.peaks)-1]
	for i := len(t.peaks) - 2; i >= 0; i-- {
		r = nodeHash(t.peaks[i], r)
	}
	return r
}

// State is the tree's compact form: its size and the roots of its
// perfect subtrees (what a rotated-away prefix leaves behind).
func (t *Tree) State() (size uint64, peaks [][32]byte) {
	return t.size, append([][32]byte(nil), t.peaks...)
}

// Restore sets the tree to a state from State; it reports false when the
// peaks do not fit the size.
func (t *Tree) Restore(size uint64, peaks [][32]byte) bool {
	n := 0
	for s := size; s > 0; s >>= 1 {
		n += int(s & 1)
	}
	if n != len(peaks) {
		return false
	}
	t.size, t.peaks = size, append([][32]byte(nil), peaks...)
	return true
}
