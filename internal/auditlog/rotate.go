package auditlog

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
)

// RotateOperation is the first record of a trail whose earlier records
// were rotated away (after the collector had them). Its details carry
// the tree and chain state the earlier records left, so that verification
// goes on; a signed checkpoint at that size proves the state.
const RotateOperation = "audit.rotate"

// RotateState is what a rotation record's details hold.
type RotateState struct {
	Size  uint64   `json:"size"`
	Peaks []string `json:"peaks"`
	Chain string   `json:"chain"`
}

// EncodeRotate renders the state of t and chain as details.
func EncodeRotate(t *Tree, chain [32]byte) string {
	size, peaks := t.State()
	st := RotateState{Size: size, Chain: hex.EncodeToString(chain[:])}
	for _, p := range peaks {
		st.Peaks = append(st.Peaks, hex.EncodeToString(p[:]))
	}
	b, _ := json.Marshal(st)
	return string(b)
}

// DecodeRotate restores a tree and chain from a rotation record's details.
func DecodeRotate(details string) (Tree, [32]byte, error) {
	var st RotateState
	var t Tree
	var chain [32]byte
	if err := json.Unmarshal([]byte(details), &st); err != nil {
		return t, chain, fmt.Errorf("rotation record: %w", err)
	}
	var peaks [][32]byte
	for _, p := range st.Peaks {
		b, err := hex.DecodeString(p)
		if err != nil || len(b) != 32 {
			return t, chain, fmt.Errorf("rotation record: peak %q", p)
		}
		peaks = append(peaks, [32]byte(b))
	}
	if !t.Restore(st.Size, peaks) {
		return t, chain, fmt.Errorf("rotation record: %d peaks do not fit size %d", len(peaks), st.Size)
	}
	c, err := hex.DecodeString(st.Chain)
	if err != nil || len(c) != 32 {
		return t, chain, fmt.Errorf("rotation record: chain %q", st.Chain)
	}
	copy(chain[:], c)
	return t, chain, nil
}
