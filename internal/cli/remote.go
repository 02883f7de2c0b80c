package cli

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// remoteTLS is the client side of the remote API: the user's certificate
// and key, the device's certificate checked against --ca, TLS 1.2 or
// newer.
func (a *app) remoteTLS() (*tls.Config, error) {
	if a.cert == "" || a.key == "" || a.ca == "" {
		return nil, fmt.Errorf("--remote needs --cert, --key and --ca")
	}
	pair, err := tls.LoadX509KeyPair(a.cert, a.key)
	if err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	b, err := os.ReadFile(a.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("--ca %s holds no certificate", a.ca)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, MinVersion: tls.VersionTLS12,
		// The device's certificate names the device, not a host name: it
		// is checked against the CA, not against the address.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var certs []*x509.Certificate
			for _, r := range raw {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return err
				}
				certs = append(certs, c)
			}
			if len(certs) == 0 {
				return fmt.Errorf("the device sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			return err
		}}, nil
}
