package auditlog

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
)

// FuzzVerifyTrail: the verifier is the security boundary and reads files
// an attacker controls: any log, checkpoints and saved note give a report,
// never a crash, and a trail with problems never reads as OK.
func FuzzVerifyTrail(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	note, _ := Sign(Checkpoint{Origin: "o", Size: 1, Time: 1}, key)
	f.Add([]byte(`{"seq":1,"chain":""}`+"\n"), note, []byte(nil))
	f.Add([]byte("not json\n{\"seq\":2}"), []byte("o\n1\nAAAA\n\n\u2014 x y\n"), note)
	f.Fuzz(func(t *testing.T, log, cp, saved []byte) {
		r := Verify(log, [][]byte{cp}, saved, []crypto.PublicKey{key.Public()})
		if r.OK() && len(r.Problems) != 0 {
			t.Fatal("OK with problems")
		}
		Open(cp, []crypto.PublicKey{key.Public()})
		ReadCheckpoints(cp)
	})
}
