package tpm

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// VersionsIndex is the NV index holding the highest installed version of
// each guest OS (owner range, documented in docs/attestation.md).
const VersionsIndex tpmutil.Handle = 0x01000C10

const (
	versionEntry   = 16 // 8 bytes of SHA-256(name), 8 bytes version
	versionsSize   = 1024
	versionEntries = versionsSize / versionEntry
)

// Versions is the guest OS rollback counter kept in TPM NV memory. The
// state directory holds the same numbers in versions.json, but a root
// attacker (or a careless restore) can put back an old copy of it; the
// TPM's copy only ever goes up, so a downgrade stays refused.
//
// One index holds up to 64 names; the table is read once and cached.
type Versions struct {
	rw    io.ReadWriter
	mu    sync.Mutex
	table []byte
}

// OpenVersions reads the table, defining the index on first use.
func OpenVersions(rw io.ReadWriter) (*Versions, error) {
	v := &Versions{rw: rw}
	pub, err := tpm2.NVReadPublic(rw, VersionsIndex)
	if err != nil {
		attrs := tpm2.AttrOwnerWrite | tpm2.AttrOwnerRead | tpm2.AttrNoDA
		derr := tpm2.NVDefineSpace(rw, tpm2.HandleOwner, VersionsIndex, "", "", nil, attrs, versionsSize)
		if derr == nil {
			v.table = make([]byte, versionsSize)
			return v, v.write()
		}
		// Another process defined it meanwhile: read that one.
		if pub, err = tpm2.NVReadPublic(rw, VersionsIndex); err != nil {
			return nil, fmt.Errorf("define NV index %#x: %w", uint32(VersionsIndex), derr)
		}
	}
	if pub.DataSize != versionsSize {
		return nil, fmt.Errorf("NV index %#x has %d bytes, not CML's %d (refusing to reuse it)", uint32(VersionsIndex), pub.DataSize, versionsSize)
	}
	if pub.Attributes&tpm2.AttrWritten == 0 {
		v.table = make([]byte, versionsSize)
		return v, v.write()
	}
	if v.table, err = tpm2.NVReadEx(rw, VersionsIndex, tpm2.HandleOwner, "", 0); err != nil {
		return nil, fmt.Errorf("read NV index %#x: %w", uint32(VersionsIndex), err)
	}
	if len(v.table) != versionsSize {
		return nil, fmt.Errorf("read NV index %#x: %d bytes", uint32(VersionsIndex), len(v.table))
	}
	return v, nil
}

func nameKey(name string) []byte {
	h := sha256.Sum256([]byte(name))
	return h[:8]
}

// find returns the offset of name's entry, or of the first free entry
// (found false), or -1 when the table is full.
func (v *Versions) find(name string) (int, bool) {
	key := nameKey(name)
	free := -1
	for off := 0; off < versionsSize; off += versionEntry {
		e := v.table[off : off+versionEntry]
		if bytes.Equal(e[:8], key) {
			return off, true
		}
		if free < 0 && bytes.Equal(e, make([]byte, versionEntry)) {
			free = off
		}
	}
	return free, false
}

// Highest returns the highest version of name the TPM has recorded.
func (v *Versions) Highest(name string) uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	if off, ok := v.find(name); ok {
		return binary.BigEndian.Uint64(v.table[off+8 : off+16])
	}
	return 0
}

// Raise records version for name unless a higher one is recorded.
func (v *Versions) Raise(name string, version uint64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	off, ok := v.find(name)
	if ok && binary.BigEndian.Uint64(v.table[off+8:off+16]) >= version {
		return nil
	}
	if off < 0 {
		return errors.New("TPM rollback table is full (64 guest OS names)")
	}
	old := append([]byte(nil), v.table...)
	copy(v.table[off:], nameKey(name))
	binary.BigEndian.PutUint64(v.table[off+8:], version)
	if err := v.write(); err != nil {
		v.table = old
		return err
	}
	return nil
}

func (v *Versions) write() error {
	// TPM2_NV_Write takes at most MAX_NV_BUFFER_SIZE (commonly 1024)
	// bytes; write in halves to stay under any TPM's limit.
	const chunk = versionsSize / 2
	for off := 0; off < versionsSize; off += chunk {
		if err := tpm2.NVWrite(v.rw, tpm2.HandleOwner, VersionsIndex, "", v.table[off:off+chunk], uint16(off)); err != nil {
			return fmt.Errorf("write NV index %#x: %w", uint32(VersionsIndex), err)
		}
	}
	return nil
}
