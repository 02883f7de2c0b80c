package cli

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/cmlproject/cml/internal/token"
)

// tokenSigner logs in to the PKCS#11 token of --pkcs11-module (PIN from
// --pkcs11-pin-file or asked) and opens the key --key-label.
func (a *app) tokenSigner(generate bool) (*token.Signer, error) {
	if a.p11Key == "" {
		return nil, fmt.Errorf("--pkcs11-module needs --key-label")
	}
	pin, err := readPIN(fmt.Sprintf("PIN of the token holding %s: ", a.p11Key), a.p11PINFile)
	if err != nil {
		return nil, err
	}
	defer zero(pin)
	if generate {
		return token.GenerateSigner(a.p11Module, a.p11Token, a.p11Key, pin)
	}
	s, err := token.OpenSigner(a.p11Module, a.p11Token, a.p11Key, pin)
	if errors.Is(err, token.ErrWrongPIN) {
		return nil, fmt.Errorf("the token refused the PIN")
	}
	return s, err
}

// tokenCert pairs --cert with its key on the token; the certificate
// must be for that key.
func (a *app) tokenCert() (tls.Certificate, error) {
	b, err := os.ReadFile(a.cert)
	if err != nil {
		return tls.Certificate{}, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return tls.Certificate{}, fmt.Errorf("%s holds no PEM certificate", a.cert)
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return tls.Certificate{}, err
	}
	s, err := a.tokenSigner(false)
	if err != nil {
		return tls.Certificate{}, err
	}
	a.signer = s
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(s.Public()) {
		return tls.Certificate{}, fmt.Errorf("%s is not the certificate of key %q on the token", a.cert, a.p11Key)
	}
	return tls.Certificate{Certificate: [][]byte{blk.Bytes}, PrivateKey: s, Leaf: leaf}, nil
}

// clientCmd makes the request for a client certificate whose key is
// generated on a PKCS#11 token and never leaves it.
func (a *app) clientCmd() *cobra.Command {
	c := &cobra.Command{Use: "client", Short: "Client keys for the remote API"}
	var cn, out string
	var existing bool
	csr := &cobra.Command{
		Use:   "csr --pkcs11-module M --key-label L --cn NAME",
		Short: "Generate a P-256 key on the PKCS#11 token (or use the existing one with --existing) and write a certificate request for the owner CA",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if a.p11Module == "" || cn == "" {
				return fmt.Errorf("client csr needs --pkcs11-module, --key-label and --cn")
			}
			s, err := a.tokenSigner(!existing)
			if err != nil {
				return err
			}
			defer s.Close()
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, s)
			if err != nil {
				return fmt.Errorf("certificate request: %w", err)
			}
			p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
			if out == "" || out == "-" {
				_, err = a.stdout.Write(p)
				return err
			}
			return os.WriteFile(out, p, 0o644)
		},
	}
	csr.Flags().StringVar(&cn, "cn", "", "common name of the certificate (the name an account maps with --cert-name)")
	csr.Flags().StringVar(&out, "out", "", "write the request to this file (default: standard output)")
	csr.Flags().BoolVar(&existing, "existing", false, "use the key already on the token under --key-label")
	c.AddCommand(csr)
	return c
}

// remoteTLS is the client side of the remote API: the user's certificate
// and key, the device's certificate checked against --ca, TLS 1.2 or
// newer.
func (a *app) remoteTLS() (*tls.Config, error) {
	if a.cert == "" || (a.key == "" && a.p11Module == "") || a.ca == "" {
		return nil, fmt.Errorf("--remote needs --cert, --key (or --pkcs11-module and --key-label) and --ca")
	}
	var pair tls.Certificate
	var err error
	if a.p11Module != "" {
		pair, err = a.tokenCert()
	} else {
		pair, err = tls.LoadX509KeyPair(a.cert, a.key)
	}
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
		VerifyConnection: func(cs tls.ConnectionState) error {
			certs := cs.PeerCertificates
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
