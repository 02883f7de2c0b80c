package sign

import (
	"testing"
	"time"
)

// FuzzParseRevocationList: CRLs come from clients (cmlctl ca crl load).
func FuzzParseRevocationList(f *testing.F) {
	k, _ := GenerateKey("ecdsa-p256")
	ca, _ := Issue(nil, k, k.Public(), CertOptions{CommonName: "fuzz CA", CA: true, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)})
	if ca != nil {
		crl, _ := RevocationList(ca, k, nil, 1, time.Now(), time.Hour)
		f.Add(crl)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ParseRevocationList(b)
		ParseCertificates(b)
	})
}
