package audit

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/auditlog"
	"github.com/cmlproject/cml/internal/testutil"
)

// trail writes n records with a checkpoint every 10 and returns the log
// path, the device key and the verifier's view.
func trail(t *testing.T, n int) (string, *ecdsa.PrivateKey) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	s.SetSigner(key, "cml audit test-device", 10, time.Hour)
	for i := 0; i < n; i++ {
		if err := s.Record(context.Background(), Event{Type: "management", Operation: "control.Start", Object: fmt.Sprint("c", i), Outcome: Success}); err != nil {
			t.Fatal(err)
		}
		if (i+1)%10 == 0 {
			s.Checkpoint()
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return path, key
}

func verify(t *testing.T, path string, log []byte, keys []crypto.PublicKey, saved []byte) *auditlog.Report {
	t.Helper()
	b, _ := os.ReadFile(path + ".checkpoints")
	notes, err := auditlog.ReadCheckpoints(b)
	if err != nil {
		t.Fatal(err)
	}
	return auditlog.Verify(log, notes, saved, keys)
}

func lines(b []byte) [][]byte {
	return bytes.SplitAfter(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
}

func join(ls [][]byte) []byte {
	out := bytes.Join(ls, nil)
	if !bytes.HasSuffix(out, []byte("\n")) {
		out = append(out, '\n')
	}
	return out
}

// TestVerifierFindsTampering: the verifier, the security boundary, names
// each attack on the trail (and passes the untouched one).
func TestVerifierFindsTampering(t *testing.T) {
	path, key := trail(t, 45)
	keys := []crypto.PublicKey{key.Public()}
	log, _ := os.ReadFile(path)
	if r := verify(t, path, log, keys, nil); !r.OK() || r.Entries != 45 || r.Checkpoints < 4 {
		t.Fatalf("untouched trail: %+v", r)
	}
	ls := lines(log)
	edit := func(f func([][]byte) [][]byte) []byte {
		c := make([][]byte, len(ls))
		for i := range ls {
			c[i] = append([]byte(nil), ls[i]...)
		}
		return join(f(c))
	}
	cases := []struct {
		name, kind, text string
		log              []byte
	}{
		{"modified", "modified", "record 17 (line 17)", edit(func(c [][]byte) [][]byte {
			c[16] = bytes.Replace(c[16], []byte(`"c16"`), []byte(`"cX6"`), 1)
			return c
		})},
		{"deleted", "deleted", "records 23 to 23 are missing", edit(func(c [][]byte) [][]byte { return append(c[:22], c[23:]...) })},
		{"inserted", "reordered", "record 5 comes after record 30", edit(func(c [][]byte) [][]byte {
			return append(c[:30], append([][]byte{c[4]}, c[30:]...)...)
		})},
		{"reordered", "reordered", "record 10 comes before record 9", edit(func(c [][]byte) [][]byte {
			c[8], c[9] = c[9], c[8]
			return c
		})},
		{"truncated", "truncated", "has 38 records but a checkpoint says 45", edit(func(c [][]byte) [][]byte { return c[:38] })},
		{"torn", "torn", "incomplete", func() []byte { b := join(ls); return b[:len(b)-20] }()},
	}
	for _, c := range cases {
		r := verify(t, path, c.log, keys, nil)
		if r.OK() || r.Problems[0].Kind != c.kind || !strings.Contains(r.Problems[0].Text, c.text) {
			t.Errorf("%s: %+v, want first problem %s %q", c.name, r.Problems, c.kind, c.text)
		}
	}

	// Someone who rewrites a record and recomputes every chain value
	// after it: the chain holds, the signed Merkle root does not.
	rewritten := rechain(t, edit(func(c [][]byte) [][]byte {
		c[16] = bytes.Replace(c[16], []byte(`"c16"`), []byte(`"cX6"`), 1)
		return c
	}))
	if r := verify(t, path, rewritten, keys, nil); r.OK() || r.Problems[0].Kind != "rewritten" || !strings.Contains(r.Problems[0].Text, "at or before record 20") {
		t.Errorf("rewritten with recomputed chain: %+v", r.Problems)
	}

	// Checkpoints signed by another device's key are refused.
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if r := verify(t, path, log, []crypto.PublicKey{other.Public()}, nil); r.OK() || r.Problems[0].Kind != "forged" {
		t.Errorf("another device's key: %+v", r.Problems)
	}

	// Root on the device rewrites the trail and re-signs every checkpoint
	// with the device key: only a checkpoint kept off the device shows it.
	saved, err := auditlog.Sign(auditlog.Checkpoint{Origin: "cml audit test-device", Size: 45, Root: rootOf(log), Time: 1}, key)
	if err != nil {
		t.Fatal(err)
	}
	resigned := filepath.Join(t.TempDir(), "audit.log")
	os.WriteFile(resigned, rewritten, 0o600)
	var notes bytes.Buffer
	for _, size := range []int{10, 20, 30, 40, 45} {
		n, _ := auditlog.Sign(auditlog.Checkpoint{Origin: "cml audit test-device", Size: uint64(size), Root: rootOf(join(lines(rewritten)[:size])), Time: 2}, key)
		fmt.Fprintf(&notes, "{\"note\":%q}\n", n)
	}
	os.WriteFile(resigned+".checkpoints", notes.Bytes(), 0o600)
	if r := verify(t, resigned, rewritten, keys, nil); !r.OK() {
		t.Errorf("a fully re-signed trail should verify without an outside checkpoint (the documented limit): %+v", r.Problems)
	}
	if r := verify(t, resigned, rewritten, keys, saved); r.OK() || r.Problems[0].Kind != "rewritten" {
		t.Errorf("re-signed trail against a saved checkpoint: %+v", r.Problems)
	}
	if r := verify(t, resigned, join(lines(rewritten)[:44]), keys, saved); r.OK() {
		t.Errorf("truncated below a saved checkpoint: verified")
	}
}

// rechain recomputes every chain value, as an attacker with the format
// would.
func rechain(t *testing.T, log []byte) []byte {
	var prev [32]byte
	var out [][]byte
	for _, l := range lines(log) {
		l = bytes.TrimSuffix(l, []byte("\n"))
		blank, _, ok := auditlog.Blank(l)
		if !ok {
			t.Fatal("no chain")
		}
		next := auditlog.Chain(prev, blank)
		out = append(out, append(bytes.Replace(blank, []byte(`"chain":""`), []byte(`"chain":"`+hex.EncodeToString(next[:])+`"`), 1), '\n'))
		prev = next
	}
	return join(out)
}

func rootOf(log []byte) [32]byte {
	var tr auditlog.Tree
	for _, l := range lines(log) {
		tr.Append(auditlog.LeafHash(bytes.TrimSuffix(l, []byte("\n"))))
	}
	return tr.Root()
}

// TestConcurrentWritersAndRestart: 100 writers at once: every sequence
// number exactly once; a reopened trail (a restart) goes on from there and
// still verifies; a torn last record is moved aside, never glued on.
func TestConcurrentWritersAndRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	s.SetSigner(key, "o", 50, time.Hour)
	var wg sync.WaitGroup
	for w := 0; w < 100; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				if err := s.Record(context.Background(), Event{Type: "t", Operation: "op", Object: fmt.Sprint(w, "/", i), Outcome: Success}); err != nil {
					t.Error(err)
				}
			}
		}(w)
	}
	wg.Wait()
	s.Close()
	log, _ := os.ReadFile(path)
	if r := verify(t, path, log, []crypto.PublicKey{key.Public()}, nil); !r.OK() || r.Entries != 2000 {
		t.Fatalf("after 100 concurrent writers: %d entries, %+v", r.Entries, r.Problems)
	}
	// A crash mid-write: half a record at the end.
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(`{"time":"2026-01-01T00:00:00Z","type":"t","operation":"half`)
	f.Close()
	s, err = OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.Torn == "" {
		t.Fatal("torn record not detected")
	}
	s.SetSigner(key, "o", 50, time.Hour)
	s.Record(context.Background(), Event{Type: "t", Operation: "after restart", Outcome: Success})
	s.Close()
	log, _ = os.ReadFile(path)
	r := verify(t, path, log, []crypto.PublicKey{key.Public()}, nil)
	if !r.OK() || r.Entries != 2001 {
		t.Errorf("after the torn record and a restart: %d entries, %+v", r.Entries, r.Problems)
	}
	if !bytes.Contains(log, []byte(`"seq":2001`)) || bytes.Contains(log, []byte("half")) {
		t.Errorf("sequence does not go on, or the torn record was kept in the trail")
	}
}

// TestCapacity: crossing each warning threshold writes a warning record;
// at capacity a record is refused (ErrFull) and the full action runs once;
// no record is lost or torn, and the trail verifies.
func TestCapacity(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	fulls := make(chan string, 4)
	var warned []int
	var mu sync.Mutex
	s.SetCapacity(64<<10, []int{50, 80}, func(r string) { fulls <- r }, func(p int) { mu.Lock(); warned = append(warned, p); mu.Unlock() })
	var ok int
	for i := 0; i < 1000; i++ {
		if err := s.Record(context.Background(), Event{Type: "t", Operation: "op", Object: strings.Repeat("x", 100), Outcome: Success}); err != nil {
			if err != ErrFull {
				t.Fatal(err)
			}
			break
		}
		ok++
	}
	if !s.Full() {
		t.Error("not full at capacity")
	}
	select {
	case r := <-fulls:
		if !strings.Contains(r, "capacity") {
			t.Errorf("full reason %q", r)
		}
	case <-time.After(2 * time.Second):
		t.Error("the full action did not run")
	}
	s.Record(context.Background(), Event{Type: "t", Operation: "op", Outcome: Success})
	select {
	case <-fulls:
		t.Error("the full action ran twice")
	case <-time.After(100 * time.Millisecond):
	}
	mu.Lock()
	if fmt.Sprint(warned) != "[50 80]" {
		t.Errorf("warnings %v", warned)
	}
	mu.Unlock()
	s.Close()
	log, _ := os.ReadFile(path)
	r := auditlog.Verify(log, nil, nil, nil)
	if !r.OK() || int(r.Entries) != ok+2 || !bytes.Contains(log, []byte("over 80% of its capacity")) {
		t.Errorf("%d records written (+2 warnings), trail has %d: %+v", ok, r.Entries, r.Problems)
	}
}

// TestDiskFull: on a real full filesystem (a 128 KiB tmpfs filled on
// purpose) Full refuses before a record could fail; a write that fails
// anyway leaves no partial record; after space is made the trail goes on.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	if err := syscallMount(dir, "size=128k"); err != nil {
		t.Skipf("tmpfs: %v", err)
	}
	defer syscallUnmount(dir)
	path := filepath.Join(dir, "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	fulls := make(chan string, 1)
	s.SetCapacity(0, nil, func(r string) { fulls <- r }, nil)
	filler := filepath.Join(dir, "filler")
	os.WriteFile(filler, make([]byte, 100<<10), 0o600)
	var n int
	for ; n < 2000 && !s.Full(); n++ {
		if err := s.Record(context.Background(), Event{Type: "t", Operation: "op", Object: strings.Repeat("y", 200), Outcome: Success}); err != nil {
			t.Fatalf("record %d failed before Full said so: %v", n, err)
		}
	}
	if !s.Full() {
		t.Fatal("never full")
	}
	if r := <-fulls; !strings.Contains(r, "filesystem is full") {
		t.Errorf("reason %q", r)
	}
	// Past the reserve a write fails: nothing partial stays.
	for i := 0; i < 200; i++ {
		if s.Record(context.Background(), Event{Type: "t", Operation: "op", Object: strings.Repeat("z", 2000), Outcome: Success}) != nil {
			break
		}
	}
	os.Remove(filler)
	if !s.Recovered() {
		t.Fatal("not recovered after space was made")
	}
	if err := s.Record(context.Background(), Event{Type: "t", Operation: "after", Outcome: Success}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	log, _ := os.ReadFile(path)
	if r := auditlog.Verify(log, nil, nil, nil); !r.OK() {
		t.Errorf("after the disk was full: %+v", r.Problems)
	}
}

// TestUpgradedTrail: a trail from before sequence numbers (an upgraded
// device) goes on; its old records count as legacy, the rest verifies.
func TestUpgradedTrail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	os.WriteFile(path, []byte(`{"time":"2026-01-01T00:00:00Z","type":"daemon","operation":"daemon.start","outcome":"success"}`+"\n"+
		`{"time":"2026-01-01T00:00:01Z","type":"daemon","operation":"daemon.stop","outcome":"success"}`+"\n"), 0o600)
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Record(context.Background(), Event{Type: "daemon", Operation: "daemon.start", Outcome: Success})
	s.Close()
	log, _ := os.ReadFile(path)
	r := auditlog.Verify(log, nil, nil, nil)
	if !r.OK() || r.Legacy != 2 || r.Entries != 3 || !bytes.Contains(log, []byte(`"seq":3`)) {
		t.Errorf("upgraded trail: legacy %d entries %d %+v", r.Legacy, r.Entries, r.Problems)
	}
}

// TestRotate: at capacity, once the collector holds everything, the
// records are rotated away; the trail stays verifiable from the rotation
// record and the checkpoint signed at its point, the sequence goes on,
// and records are taken again. A rewritten rotation state is caught.
func TestRotate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	s.SetSigner(key, "o", 1000, time.Hour)
	s.SetCapacity(32<<10, []int{75, 90}, func(string) {}, nil)
	n := 0
	for ; s.Record(context.Background(), Event{Type: "t", Operation: "op", Object: strings.Repeat("r", 100), Outcome: Success}) == nil; n++ {
	}
	if !s.Full() {
		t.Fatal("not full")
	}
	if err := s.Rotate(func(int64) bool { return false }); err == nil {
		t.Fatal("rotated what the collector does not hold")
	}
	if err := s.Rotate(func(int64) bool { return true }); err != nil {
		t.Fatal(err)
	}
	if s.Full() {
		t.Error("still full after the rotation")
	}
	if err := s.Record(context.Background(), Event{Type: "t", Operation: "after rotation", Outcome: Success}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	log, _ := os.ReadFile(path)
	r := verify(t, path, log, []crypto.PublicKey{key.Public()}, nil)
	if !r.OK() || r.Rotated == 0 || r.Entries != r.Rotated+2 {
		t.Errorf("after rotation: rotated %d entries %d %+v", r.Rotated, r.Entries, r.Problems)
	}
	// Reopened (a restart), it goes on from the rotation state.
	s, _ = OpenFile(path, nil)
	s.SetSigner(key, "o", 1000, time.Hour)
	s.Record(context.Background(), Event{Type: "t", Operation: "after restart", Outcome: Success})
	s.Close()
	log, _ = os.ReadFile(path)
	if r := verify(t, path, log, []crypto.PublicKey{key.Public()}, nil); !r.OK() {
		t.Errorf("after a restart: %+v", r.Problems)
	}
	// Someone forges the rotation state: the checkpoint catches it.
	forged := bytes.Replace(log, []byte(`"size\":`), []byte(`"size\":1`), 1)
	if r := verify(t, path, forged, []crypto.PublicKey{key.Public()}, nil); r.OK() {
		t.Error("a forged rotation record verified")
	}
}

// heldSigner signs only when the test lets it: entered reports each
// signature begun, release lets one finish.
type heldSigner struct {
	crypto.Signer
	entered, release chan struct{}
}

func (h heldSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	h.entered <- struct{}{}
	<-h.release
	return h.Signer.Sign(r, d, o)
}

// TestRotateSignsOutsideTheLock: while the TPM signs the checkpoint a
// rotation needs (held here), other writers' records go on; the records
// that came in meanwhile are under the checkpoint signed next, and the
// rotated trail verifies.
func TestRotateSignsOutsideTheLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	hs := heldSigner{Signer: key, entered: make(chan struct{}), release: make(chan struct{})}
	s.SetSigner(hs, "o", 1000, time.Hour)
	for i := 0; i < 10; i++ {
		s.Record(context.Background(), Event{Type: "t", Operation: "before", Outcome: Success})
	}
	rotated := make(chan error, 1)
	go func() { rotated <- s.Rotate(func(int64) bool { return true }) }()
	<-hs.entered
	wrote := make(chan error, 1)
	go func() {
		wrote <- s.Record(context.Background(), Event{Type: "t", Operation: "during signing", Outcome: Success})
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a record waited for the rotation's TPM signature")
	}
	hs.release <- struct{}{}
	// The record written meanwhile needs a second signature.
	<-hs.entered
	hs.release <- struct{}{}
	if err := <-rotated; err != nil {
		t.Fatal(err)
	}
	go func() {
		for range hs.entered {
			hs.release <- struct{}{}
		}
	}()
	s.Record(context.Background(), Event{Type: "t", Operation: "after rotation", Outcome: Success})
	s.Close()
	close(hs.entered)
	log, _ := os.ReadFile(path)
	if r := verify(t, path, log, []crypto.PublicKey{key.Public()}, nil); !r.OK() || r.Rotated != 11 {
		t.Errorf("rotated %d (want 11): %+v", r.Rotated, r.Problems)
	}
}

// TestFailedCommitDropsItsBatch: when the group commit's write fails
// (here: the file descriptor turned read-only), every writer of the batch
// gets the error, the trail rolls back to its durable state, and after
// recovery the records go on with no gap in sequence or chain (the file
// verifies); nothing was acknowledged that the file does not hold.
func TestFailedCommitDropsItsBatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if err := s.Record(context.Background(), Event{Type: "t", Operation: "before", Outcome: Success}); err != nil {
			t.Fatal(err)
		}
	}
	good := s.f
	ro, _ := os.Open(path)
	s.mu.Lock()
	s.f = ro
	s.mu.Unlock()
	var wg sync.WaitGroup
	var failed, ok atomic.Int32
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s.Record(context.Background(), Event{Type: "t", Operation: "lost", Outcome: Success}) != nil {
				failed.Add(1)
			} else {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 0 || failed.Load() != 16 {
		t.Fatalf("%d records acknowledged, %d failed, on a file that takes no writes", ok.Load(), failed.Load())
	}
	if !s.Full() {
		t.Error("a failed write does not refuse audited operations")
	}
	s.mu.Lock()
	s.f = good
	s.mu.Unlock()
	ro.Close()
	if !s.Recovered() {
		t.Fatal("not recovered")
	}
	for i := 0; i < 3; i++ {
		if err := s.Record(context.Background(), Event{Type: "t", Operation: "after", Outcome: Success}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	log, _ := os.ReadFile(path)
	if r := verify(t, path, log, nil, nil); !r.OK() || r.Entries != 8 || strings.Contains(string(log), `"lost"`) {
		t.Errorf("after a failed commit: %d entries %+v\n%s", r.Entries, r.Problems, log)
	}
}

// TestRollbackOnAFullDisk: the trail's filesystem fills up mid-batch (a
// tiny tmpfs) while 8 writers record, with the trail append-only: the
// failed batch is cut back out of the file all the same (no torn or
// unacknowledged record stays), and once there is room again the trail
// goes on and verifies.
func TestRollbackOnAFullDisk(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "cmlaudittest", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v %s", err, out)
	}
	defer exec.Command("umount", "-l", dir).Run()
	path := filepath.Join(dir, "audit.log")
	s, err := OpenFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !s.AppendOnly() {
		t.Skip("this tmpfs does not support the append-only attribute")
	}
	defer SetAppendOnly(path, false)
	var wg sync.WaitGroup
	var acked atomic.Int64
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s.Record(context.Background(), Event{Type: "t", Operation: "fill", Object: strings.Repeat("x", 200), Outcome: Success}) == nil {
				acked.Add(1)
			}
		}()
	}
	wg.Wait()
	st, _ := os.Stat(path)
	s.mu.Lock()
	synced, seq := s.synced, s.seq
	s.mu.Unlock()
	if st.Size() != synced || int64(seq) != acked.Load() {
		t.Errorf("after the failed batch: file %d bytes, durable %d; %d records in the state, %d acknowledged", st.Size(), synced, seq, acked.Load())
	}
	if out, err := exec.Command("mount", "-o", "remount,size=1m", dir).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v %s", err, out)
	}
	if !s.Recovered() {
		t.Fatal("not recovered with room again")
	}
	if err := s.Record(context.Background(), Event{Type: "t", Operation: "after", Outcome: Success}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	log, _ := os.ReadFile(path)
	if r := verify(t, path, log, nil, nil); !r.OK() || int64(r.Entries) != acked.Load()+1 {
		t.Errorf("%d entries (want %d): %+v", r.Entries, acked.Load()+1, r.Problems)
	}
}
