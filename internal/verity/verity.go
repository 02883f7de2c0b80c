// Package verity computes and checks dm-verity hash trees in the kernel's
// on-disk format (format version 1, SHA-256, 4 KiB data and hash blocks,
// salt prepended), so a root hash computed here equals what `veritysetup
// format` prints for the same image and salt, and a hash file written here
// opens with `veritysetup open`/`verify`.
//
// Hashing the data blocks is the expensive part and runs on all cores; the
// upper levels are 1/128 of the data and are hashed on one.
package verity

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/cmlproject/cml/internal/errdefs"
)

const (
	// BlockSize is the data and hash block size.
	BlockSize = 4096
	// SaltSize is the salt length cmlsign uses.
	SaltSize = 32
	// MaxSaltSize is the largest salt the on-disk superblock holds.
	MaxSaltSize = 256
	// SuperblockSize is the space the superblock takes at the start of a
	// hash file (one hash block).
	SuperblockSize = BlockSize

	digestSize    = sha256.Size
	hashesPerBlk  = BlockSize / digestSize // 128
	hashesPerBits = 7
)

// Tree is a dm-verity hash tree.
type Tree struct {
	Root       []byte
	Salt       []byte
	DataBlocks uint64
	// Levels holds the hash blocks of each level, level 0 (hashes of the
	// data blocks) first.
	Levels [][]byte
}

// levelSizes returns the number of hash blocks per level, level 0 first,
// as cryptsetup's hash_levels computes them.
func levelSizes(blocks uint64) []uint64 {
	levels := 0
	for hashesPerBits*levels < 64 && (blocks-1)>>(hashesPerBits*levels) != 0 {
		levels++
	}
	sizes := make([]uint64, levels)
	for i := range sizes {
		shift := uint(hashesPerBits * (i + 1))
		sizes[i] = (blocks + (1 << shift) - 1) >> shift
	}
	return sizes
}

func checkInput(size int64, salt []byte) error {
	if size <= 0 || size%BlockSize != 0 {
		return errdefs.InvalidArgument("verity: image size %d is not a positive multiple of %d", size, BlockSize)
	}
	if len(salt) > MaxSaltSize {
		return errdefs.InvalidArgument("verity: salt of %d bytes is longer than %d", len(salt), MaxSaltSize)
	}
	return nil
}

// Build computes the hash tree of the size bytes of r (a multiple of
// BlockSize). workers <= 0 means one per CPU.
func Build(r io.ReaderAt, size int64, salt []byte, workers int) (*Tree, error) {
	if err := checkInput(size, salt); err != nil {
		return nil, err
	}
	blocks := uint64(size / BlockSize)
	leaves, err := hashData(r, blocks, salt, workers)
	if err != nil {
		return nil, err
	}
	return fromLeaves(leaves, blocks, salt), nil
}

// fromLeaves builds the upper levels and the root from the data block
// hashes.
func fromLeaves(leaves []byte, blocks uint64, salt []byte) *Tree {
	t := &Tree{Salt: append([]byte(nil), salt...), DataBlocks: blocks}
	sizes := levelSizes(blocks)
	if len(sizes) == 0 { // one data block: the root is its hash
		t.Root = leaves[:digestSize]
		return t
	}
	cur := leaves
	h := sha256.New()
	for _, n := range sizes {
		lvl := make([]byte, n*BlockSize)
		copy(lvl, cur) // hashes packed, the rest of the last block zero
		t.Levels = append(t.Levels, lvl)
		next := make([]byte, 0, n*digestSize)
		for b := uint64(0); b < n; b++ {
			next = saltedSum(h, salt, lvl[b*BlockSize:(b+1)*BlockSize], next)
		}
		cur = next
	}
	t.Root = cur[:digestSize]
	return t
}

func saltedSum(h interface {
	io.Writer
	Reset()
	Sum([]byte) []byte
}, salt, block, out []byte) []byte {
	h.Reset()
	h.Write(salt)
	h.Write(block)
	return h.Sum(out)
}

// hashData returns the salted SHA-256 of every data block, in order,
// hashing contiguous ranges on parallel workers.
func hashData(r io.ReaderAt, blocks uint64, salt []byte, workers int) ([]byte, error) {
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	const chunkBlocks = 64 // 256 KiB per read
	if uint64(workers) > blocks/chunkBlocks+1 {
		workers = int(blocks/chunkBlocks + 1)
	}
	leaves := make([]byte, blocks*digestSize)
	per := (blocks + uint64(workers) - 1) / uint64(workers)
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := 0; w < workers; w++ {
		first, last := uint64(w)*per, min(uint64(w+1)*per, blocks)
		if first >= last {
			continue
		}
		wg.Add(1)
		go func(w int, first, last uint64) {
			defer wg.Done()
			buf := make([]byte, chunkBlocks*BlockSize)
			h := sha256.New()
			for b := first; b < last; b += chunkBlocks {
				n := min(chunkBlocks, last-b)
				p := buf[:n*BlockSize]
				if _, err := r.ReadAt(p, int64(b*BlockSize)); err != nil {
					if errors.Is(err, io.EOF) {
						err = errdefs.Integrity("image is shorter than %d bytes", blocks*BlockSize)
					}
					errs[w] = err
					return
				}
				for i := uint64(0); i < n; i++ {
					saltedSum(h, salt, p[i*BlockSize:(i+1)*BlockSize], leaves[(b+i)*digestSize:(b+i)*digestSize])
				}
			}
		}(w, first, last)
	}
	wg.Wait()
	return leaves, errors.Join(errs...)
}

// Check verifies that the size bytes of r hash to root. When ref (a hash
// file as WriteHashFile writes it, e.g. the one installed with the image)
// is given and itself hashes to root, a mismatch names the data block
// ranges that differ; without it, only that the image differs.
func Check(r io.ReaderAt, size int64, salt, root []byte, ref []byte, workers int) error {
	if err := checkInput(size, salt); err != nil {
		return err
	}
	blocks := uint64(size / BlockSize)
	leaves, err := hashData(r, blocks, salt, workers)
	if err != nil {
		return err
	}
	t := fromLeaves(leaves, blocks, salt)
	if bytes.Equal(t.Root, root) {
		return nil
	}
	if rt, err := ParseHashFile(ref); err == nil && rt.DataBlocks == blocks && bytes.Equal(rt.Salt, salt) && len(rt.Levels) > 0 {
		if rt2 := fromLeaves(rt.Levels[0][:blocks*digestSize], blocks, salt); bytes.Equal(rt2.Root, root) {
			return errdefs.Integrity("root hash mismatch: data blocks %s differ from the signed hash tree", diffRanges(leaves, rt.Levels[0], blocks))
		}
	}
	return errdefs.Integrity("root hash %s does not match the signed %s", hex.EncodeToString(t.Root), hex.EncodeToString(root))
}

// diffRanges lists the block ranges whose hashes differ, e.g. "12-15, 40".
func diffRanges(a, b []byte, blocks uint64) string {
	var out []string
	start := int64(-1)
	flush := func(end uint64) {
		if start < 0 {
			return
		}
		if uint64(start) == end-1 {
			out = append(out, fmt.Sprint(start))
		} else {
			out = append(out, fmt.Sprintf("%d-%d", start, end-1))
		}
		start = -1
	}
	for i := uint64(0); i < blocks; i++ {
		if !bytes.Equal(a[i*digestSize:(i+1)*digestSize], b[i*digestSize:(i+1)*digestSize]) {
			if start < 0 {
				start = int64(i)
			}
		} else {
			flush(i)
		}
		if len(out) >= 8 {
			return fmt.Sprintf("%s, ... (of %d blocks of %d bytes)", join(out), blocks, BlockSize)
		}
	}
	flush(blocks)
	return fmt.Sprintf("%s (of %d blocks of %d bytes)", join(out), blocks, BlockSize)
}

func join(s []string) string {
	var b bytes.Buffer
	for i, x := range s {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(x)
	}
	return b.String()
}

// superblock layout (struct verity_sb in cryptsetup, 512 bytes, LE).
const (
	sbSignature = "verity\x00\x00"
	sbLen       = 512
)

// HashFile returns the hash file veritysetup would write: the superblock
// padded to one block, then the levels, top level first.
func (t *Tree) HashFile() []byte {
	var buf bytes.Buffer
	sb := make([]byte, SuperblockSize)
	copy(sb[0:8], sbSignature)
	binary.LittleEndian.PutUint32(sb[8:], 1)  // version
	binary.LittleEndian.PutUint32(sb[12:], 1) // hash_type: format 1
	u := sha256.Sum256(append([]byte("cml verity uuid"), t.Root...))
	u[6] = u[6]&0x0f | 0x40 // a v4-shaped UUID, derived so builds reproduce
	u[8] = u[8]&0x3f | 0x80
	copy(sb[16:32], u[:16])
	copy(sb[32:64], "sha256")
	binary.LittleEndian.PutUint32(sb[64:], BlockSize)
	binary.LittleEndian.PutUint32(sb[68:], BlockSize)
	binary.LittleEndian.PutUint64(sb[72:], t.DataBlocks)
	binary.LittleEndian.PutUint16(sb[80:], uint16(len(t.Salt)))
	copy(sb[88:88+MaxSaltSize], t.Salt)
	buf.Write(sb)
	for i := len(t.Levels) - 1; i >= 0; i-- {
		buf.Write(t.Levels[i])
	}
	return buf.Bytes()
}

// ParseHashFile parses a hash file with superblock. The returned tree's
// Root is not set: it is only trustworthy once recomputed.
func ParseHashFile(b []byte) (*Tree, error) {
	if len(b) < SuperblockSize || string(b[0:8]) != sbSignature {
		return nil, errdefs.InvalidArgument("verity hash file: no superblock")
	}
	if binary.LittleEndian.Uint32(b[8:]) != 1 || binary.LittleEndian.Uint32(b[12:]) != 1 ||
		string(bytes.TrimRight(b[32:64], "\x00")) != "sha256" ||
		binary.LittleEndian.Uint32(b[64:]) != BlockSize || binary.LittleEndian.Uint32(b[68:]) != BlockSize {
		return nil, errdefs.InvalidArgument("verity hash file: not format 1, sha256, %d-byte blocks", BlockSize)
	}
	t := &Tree{DataBlocks: binary.LittleEndian.Uint64(b[72:])}
	sl := int(binary.LittleEndian.Uint16(b[80:]))
	if sl > MaxSaltSize || t.DataBlocks == 0 {
		return nil, errdefs.InvalidArgument("verity hash file: bad superblock")
	}
	t.Salt = append([]byte(nil), b[88:88+sl]...)
	sizes := levelSizes(t.DataBlocks)
	var total uint64
	for _, n := range sizes {
		total += n * BlockSize
	}
	if uint64(len(b)-SuperblockSize) < total {
		return nil, errdefs.InvalidArgument("verity hash file: %d bytes, want %d", len(b), total+SuperblockSize)
	}
	t.Levels = make([][]byte, len(sizes))
	off := uint64(SuperblockSize)
	for i := len(sizes) - 1; i >= 0; i-- {
		t.Levels[i] = b[off : off+sizes[i]*BlockSize]
		off += sizes[i] * BlockSize
	}
	return t, nil
}

// HashFileSize is the size of the hash file for an image of size bytes.
func HashFileSize(size int64) int64 {
	var total uint64
	for _, n := range levelSizes(uint64(size / BlockSize)) {
		total += n * BlockSize
	}
	return int64(total) + SuperblockSize
}
