package auditlog

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
)

// ChainField is how a record carries its chain value; the chain is
// computed over the record with the value empty.
const chainKey = `"chain":"`

// Chain returns the next chain value: SHA-256(prev || record with an
// empty chain value).
func Chain(prev [32]byte, blank []byte) [32]byte {
	h := sha256.New()
	h.Write(prev[:])
	h.Write(blank)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// Blank returns a record line with its chain value emptied, and the value.
func Blank(line []byte) (blank []byte, value string, ok bool) {
	i := bytes.LastIndex(line, []byte(chainKey))
	if i < 0 {
		return nil, "", false
	}
	j := bytes.IndexByte(line[i+len(chainKey):], '"')
	if j < 0 {
		return nil, "", false
	}
	value = string(line[i+len(chainKey) : i+len(chainKey)+j])
	blank = append(append(append([]byte{}, line[:i+len(chainKey)]...), '"'), line[i+len(chainKey)+j+1:]...)
	return blank, value, true
}

// Problem is one finding of the verifier.
type Problem struct {
	Line int    `json:"line,omitempty"` // 1-based line of the log
	Seq  uint64 `json:"seq,omitempty"`
	Kind string `json:"kind"` // modified, deleted, inserted, reordered, truncated, rewritten, forged, torn
	Text string `json:"text"`
}

// Report is what Verify found.
type Report struct {
	Entries     uint64    `json:"entries"`
	Checkpoints int       `json:"checkpoints_verified"`
	LastSigned  uint64    `json:"last_signed_size"`
	Root        string    `json:"root"`
	Problems    []Problem `json:"problems"`
	// Rotated is how many records were rotated away before this trail.
	Rotated uint64 `json:"rotated_records,omitempty"`
	// Legacy counts leading records written before the trail had
	// sequence numbers (an upgraded device): in the tree, not chained.
	Legacy uint64      `json:"legacy_records,omitempty"`
	Saved  *Checkpoint `json:"-"`
}

// OK reports a log without problems.
func (r *Report) OK() bool { return len(r.Problems) == 0 }

func (r *Report) add(p Problem) { r.Problems = append(r.Problems, p) }

// Verify checks a trail: every record's sequence number follows the one
// before (a gap is a deletion, a repeat or step back an insertion or
// reordering), every chain value follows from the record before (a break
// names the modified record), the Merkle root at every checkpoint's size
// is the signed one (a chain recomputed by someone rewriting the log is
// caught here), and the log is not shorter than any checkpoint
// (truncation). checkpoints are the device's signed notes; saved, when
// not nil, is a note kept off the device, the defence against a root
// attacker who rewrote log and checkpoints alike. keys verify the notes.
func Verify(log []byte, checkpoints [][]byte, saved []byte, keys []crypto.PublicKey) *Report {
	r := &Report{}
	want := map[uint64][]Checkpoint{}
	var maxSigned uint64
	for i, n := range checkpoints {
		c, err := Open(n, keys)
		if err != nil {
			r.add(Problem{Kind: "forged", Text: fmt.Sprintf("checkpoint %d: %v", i+1, err)})
			continue
		}
		r.Checkpoints++
		want[c.Size] = append(want[c.Size], c)
		if c.Size > maxSigned {
			maxSigned = c.Size
		}
	}
	if saved != nil {
		c, err := Open(saved, keys)
		if err != nil {
			r.add(Problem{Kind: "forged", Text: fmt.Sprintf("saved checkpoint: %v", err)})
		} else {
			r.Saved = &c
			want[c.Size] = append(want[c.Size], c)
			if c.Size > maxSigned {
				maxSigned = c.Size
			}
		}
	}
	var (
		tree     Tree
		chain    [32]byte
		prevSeq  uint64
		lastGood uint64
	)
	lines := bytes.Split(log, []byte("\n"))
	if n := len(lines); n > 0 && len(lines[n-1]) == 0 {
		lines = lines[:n-1]
	} else if n > 0 {
		r.add(Problem{Line: n, Kind: "torn", Text: fmt.Sprintf("line %d: the last record is incomplete (a crash mid-write); it is not part of the trail", n)})
		lines = lines[:n-1]
	}
	// Every sequence number in the log: a number missing here was
	// deleted; one that comes later was reordered.
	present := map[uint64]bool{}
	for _, line := range lines {
		var rec struct {
			Seq uint64 `json:"seq"`
		}
		if json.Unmarshal(line, &rec) == nil {
			present[rec.Seq] = true
		}
	}
	// A trail whose earlier records were rotated away starts from the
	// state its rotation record carries, proven by a checkpoint.
	if len(lines) > 0 {
		var first struct {
			Operation string `json:"operation"`
			Details   string `json:"details"`
		}
		if json.Unmarshal(lines[0], &first) == nil && first.Operation == RotateOperation {
			t, c, err := DecodeRotate(first.Details)
			if err != nil {
				r.add(Problem{Line: 1, Kind: "modified", Text: err.Error()})
				return r
			}
			tree, chain, prevSeq, lastGood = t, c, t.Size(), 0
			r.Rotated = t.Size()
			cs := want[t.Size()]
			if len(cs) == 0 {
				r.add(Problem{Line: 1, Kind: "rewritten", Text: fmt.Sprintf("records 1 to %d were rotated away, but no signed checkpoint covers that point", t.Size())})
			}
			for _, c := range cs {
				if c.Root != tree.Root() {
					r.add(Problem{Line: 1, Kind: "rewritten", Text: fmt.Sprintf("the rotation record's state does not match the checkpoint of size %d", c.Size)})
				} else {
					lastGood = c.Size
				}
			}
		}
	}
	base := prevSeq
	for i, line := range lines {
		ln := i + 1
		var rec struct {
			Seq *uint64 `json:"seq"`
		}
		err := json.Unmarshal(line, &rec)
		if err == nil && rec.Seq == nil && base == 0 && prevSeq == uint64(i) && r.Legacy == uint64(i) {
			// A record from before sequence numbers, at the start.
			r.Legacy++
			prevSeq++
			tree.Append(LeafHash(line))
			continue
		}
		if err != nil || rec.Seq == nil || *rec.Seq == 0 {
			r.add(Problem{Line: ln, Kind: "modified", Text: fmt.Sprintf("line %d is not a record of the trail", ln)})
			break
		}
		seq := *rec.Seq
		switch {
		case seq == prevSeq+1:
		case seq > prevSeq+1 && present[prevSeq+1]:
			r.add(Problem{Line: ln, Seq: seq, Kind: "reordered", Text: fmt.Sprintf("line %d: record %d comes before record %d (reordered)", ln, seq, prevSeq+1)})
		case seq > prevSeq+1:
			r.add(Problem{Line: ln, Seq: seq, Kind: "deleted", Text: fmt.Sprintf("records %d to %d are missing before line %d", prevSeq+1, seq-1, ln)})
		default:
			r.add(Problem{Line: ln, Seq: seq, Kind: "reordered", Text: fmt.Sprintf("line %d: record %d comes after record %d (inserted or reordered)", ln, seq, prevSeq)})
		}
		blank, value, ok := Blank(line)
		next := Chain(chain, blank)
		if !ok || value != hex.EncodeToString(next[:]) {
			if len(r.Problems) == 0 {
				r.add(Problem{Line: ln, Seq: seq, Kind: "modified", Text: fmt.Sprintf("record %d (line %d) was modified or inserted: its hash chain breaks", seq, ln)})
			}
			// Go on from the stored value, to find later breaks too.
			if b, err := hex.DecodeString(value); err == nil && len(b) == 32 {
				copy(next[:], b)
			}
		}
		chain, prevSeq = next, seq
		tree.Append(LeafHash(line))
		for _, c := range want[tree.Size()] {
			if c.Root != tree.Root() {
				r.add(Problem{Line: ln, Seq: seq, Kind: "rewritten", Text: fmt.Sprintf("the first %d records do not match the checkpoint signed %s: the trail was rewritten after record %d (the last checkpoint that matches) and at or before record %d", c.Size, time.Unix(c.Time, 0).UTC().Format(time.RFC3339), lastGood, c.Size)})
			} else {
				lastGood = c.Size
			}
		}
	}
	r.Entries = tree.Size()
	root := tree.Root()
	r.Root = hex.EncodeToString(root[:])
	r.LastSigned = lastGood
	if maxSigned > r.Entries {
		r.add(Problem{Kind: "truncated", Text: fmt.Sprintf("the trail has %d records but a checkpoint says %d: truncated", r.Entries, maxSigned)})
	}
	return r
}
