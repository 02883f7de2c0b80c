// Package cmlsign is the signing tool for build pipelines: it makes a
// development PKI, builds signed guest OS bundles and signs container
// configs. It never talks to the daemon; everything it writes can be
// checked with stock openssl.
package cmlsign

import (
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/trust"
)

// signerFlags select the signing key: a PEM file, or a key in a PKCS#11
// token; plus the signer's certificate chain.
type signerFlags struct {
	key, cert, module, label, pinFile string
}

func (f *signerFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.key, "key", "", "signing key (PEM: PKCS#8, SEC1 or PKCS#1)")
	cmd.Flags().StringVar(&f.cert, "cert", "", "signer certificate chain (PEM, signer first)")
	cmd.Flags().StringVar(&f.module, "pkcs11-module", "", "PKCS#11 module holding the signing key (e.g. /usr/lib/softhsm/libsofthsm2.so)")
	cmd.Flags().StringVar(&f.label, "key-label", "", "label of the key in the PKCS#11 token")
	cmd.Flags().StringVar(&f.pinFile, "pin-file", "", "file holding the token PIN (default: $CML_PKCS11_PIN)")
	cmd.MarkFlagRequired("cert")
}

func (f *signerFlags) load() (crypto.Signer, []*x509.Certificate, func(), error) {
	chain, err := readCerts(f.cert)
	if err != nil {
		return nil, nil, nil, err
	}
	switch {
	case f.module != "" && f.key != "":
		return nil, nil, nil, fmt.Errorf("use either --key or --pkcs11-module, not both")
	case f.module != "":
		if f.label == "" {
			return nil, nil, nil, fmt.Errorf("--pkcs11-module needs --key-label")
		}
		pin := os.Getenv("CML_PKCS11_PIN")
		if f.pinFile != "" {
			b, err := os.ReadFile(f.pinFile)
			if err != nil {
				return nil, nil, nil, err
			}
			pin = strings.TrimRight(string(b), "\r\n")
		}
		s, closeFn, err := OpenPKCS11Signer(f.module, f.label, pin, chain[0].PublicKey)
		return s, chain, closeFn, err
	case f.key != "":
		k, err := readKey(f.key)
		if err != nil {
			return nil, nil, nil, err
		}
		return k, chain, func() {}, nil
	}
	return nil, nil, nil, fmt.Errorf("give --key or --pkcs11-module and --key-label")
}

// NewCommand returns the cmlsign command tree.
func NewCommand(out io.Writer) *cobra.Command {
	root := &cobra.Command{Use: "cmlsign", Short: "Sign guest OS bundles and container configs for CML", SilenceUsage: true, SilenceErrors: true}
	root.SetOut(out)
	root.AddCommand(pkiCommand(out), guestosCommand(out), configCommand(out), verifyCommand(out))
	return root
}

func pkiCommand(out io.Writer) *cobra.Command {
	pki := &cobra.Command{Use: "pki", Short: "Make and manage a signing PKI"}
	var dir, alg, org string
	var days int
	var force bool
	initCmd := &cobra.Command{
		Use: "init", Short: "Make a development PKI: a root CA and a software-signing certificate under it", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if !force {
				if _, err := os.Stat(filepath.Join(dir, "root-ca.key")); err == nil {
					return fmt.Errorf("%s already holds a PKI (use --force to replace it)", dir)
				}
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			now := time.Now()
			caKey, err := sign.GenerateKey(alg)
			if err != nil {
				return err
			}
			ca, err := sign.Issue(nil, caKey, caKey.Public(), sign.CertOptions{CommonName: org + " root CA", Organization: org, CA: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0)})
			if err != nil {
				return err
			}
			key, err := sign.GenerateKey(alg)
			if err != nil {
				return err
			}
			cert, err := sign.Issue(ca, caKey, key.Public(), sign.CertOptions{CommonName: org + " software signing", Organization: org, CodeSigning: true, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(0, 0, days)})
			if err != nil {
				return err
			}
			pub, _ := sign.PublicKeyPEM(key.Public())
			for _, w := range []struct {
				name string
				data []byte
				key  crypto.Signer
			}{{"root-ca.key", nil, caKey}, {"signer.key", nil, key}, {"root-ca.pem", sign.EncodeCertificates(ca), nil}, {"signer.pem", sign.EncodeCertificates(cert), nil}, {"signer.pub", pub, nil}} {
				p := filepath.Join(dir, w.name)
				if w.key != nil {
					err = sign.WritePrivateKey(p, w.key)
				} else {
					err = os.WriteFile(p, w.data, 0o644)
				}
				if err != nil {
					return err
				}
			}
			fmt.Fprintf(out, "PKI in %s (%s): root-ca.pem (provision as vendor CA), signer.pem + signer.key (sign with these), signer.pub (for openssl)\n", dir, alg)
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "pki", "directory for the keys and certificates")
	initCmd.Flags().StringVar(&alg, "algorithm", "ecdsa-p256", "key algorithm: "+strings.Join(sign.Algorithms, ", "))
	initCmd.Flags().StringVar(&org, "org", "CML development", "organization name in the certificates")
	initCmd.Flags().IntVar(&days, "days", 730, "validity of the signing certificate in days")
	initCmd.Flags().BoolVar(&force, "force", false, "replace an existing PKI")

	var caCert, caKey, pubFile, cn, outFile string
	var isCA bool
	issue := &cobra.Command{
		Use: "issue", Short: "Issue a software-signing (or intermediate CA) certificate for a public key made elsewhere (openssl, a PKCS#11 token)", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			ca, key, err := loadCA(caCert, caKey)
			if err != nil {
				return err
			}
			pub, err := readPublicKey(pubFile)
			if err != nil {
				return err
			}
			now := time.Now()
			c, err := sign.Issue(ca, key, pub, sign.CertOptions{CommonName: cn, CA: isCA, CodeSigning: !isCA, NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(0, 0, days)})
			if err != nil {
				return err
			}
			return os.WriteFile(outFile, sign.EncodeCertificates(c), 0o644)
		},
	}
	issue.Flags().StringVar(&caCert, "ca-cert", "pki/root-ca.pem", "issuing CA certificate")
	issue.Flags().StringVar(&caKey, "ca-key", "pki/root-ca.key", "issuing CA key")
	issue.Flags().StringVar(&pubFile, "pubkey", "", "public key to certify (PEM or DER SubjectPublicKeyInfo)")
	issue.Flags().StringVar(&cn, "cn", "software signing", "common name")
	issue.Flags().StringVar(&outFile, "out", "signer.pem", "certificate to write")
	issue.Flags().IntVar(&days, "days", 730, "validity in days")
	issue.Flags().BoolVar(&isCA, "ca", false, "issue an intermediate CA instead of a signing certificate")
	issue.MarkFlagRequired("pubkey")

	var csrFile string
	device := &cobra.Command{
		Use:   "device",
		Short: "Act as fleet CA: certify a device's TLS or attestation key from its CSR (cmlctl device csr [--attestation])",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			ca, key, err := loadCA(caCert, caKey)
			if err != nil {
				return err
			}
			b, err := os.ReadFile(csrFile)
			if err != nil {
				return err
			}
			o, err := deviceCertOptions(b)
			if err != nil {
				return fmt.Errorf("%s: %w", csrFile, err)
			}
			now := time.Now()
			o.NotBefore, o.NotAfter = now.Add(-time.Hour), now.AddDate(0, 0, days)
			c, err := sign.Issue(ca, key, o.pub, o.CertOptions)
			if err != nil {
				return err
			}
			return os.WriteFile(outFile, sign.EncodeCertificates(c), 0o644)
		},
	}
	device.Flags().StringVar(&caCert, "ca-cert", "fleet/root-ca.pem", "fleet CA certificate")
	device.Flags().StringVar(&caKey, "ca-key", "fleet/root-ca.key", "fleet CA key")
	device.Flags().StringVar(&csrFile, "csr", "", "the device's certificate request (PEM)")
	device.Flags().StringVar(&outFile, "out", "device.pem", "certificate to write")
	device.Flags().IntVar(&days, "days", 3650, "validity in days")
	device.MarkFlagRequired("csr")

	var revoke []string
	var crlOut string
	var crlDays int
	crl := &cobra.Command{
		Use: "crl", Short: "Issue a CRL revoking the given certificates", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			ca, key, err := loadCA(caCert, caKey)
			if err != nil {
				return err
			}
			var certs []*x509.Certificate
			for _, p := range revoke {
				cs, err := readCerts(p)
				if err != nil {
					return err
				}
				certs = append(certs, cs[0])
			}
			now := time.Now()
			b, err := sign.RevocationList(ca, key, certs, now.UnixNano(), now, time.Duration(crlDays)*24*time.Hour)
			if err != nil {
				return err
			}
			return os.WriteFile(crlOut, b, 0o644)
		},
	}
	crl.Flags().StringVar(&caCert, "ca-cert", "pki/root-ca.pem", "issuing CA certificate")
	crl.Flags().StringVar(&caKey, "ca-key", "pki/root-ca.key", "issuing CA key")
	crl.Flags().StringSliceVar(&revoke, "revoke", nil, "certificate (PEM) to revoke; repeatable")
	crl.Flags().StringVar(&crlOut, "out", "crl.pem", "CRL to write")
	crl.Flags().IntVar(&crlDays, "days", 30, "days until the next update")
	pki.AddCommand(initCmd, issue, device, crl)
	return pki
}

func loadCA(certPath, keyPath string) (*x509.Certificate, crypto.Signer, error) {
	certs, err := readCerts(certPath)
	if err != nil {
		return nil, nil, err
	}
	key, err := readKey(keyPath)
	if err != nil {
		return nil, nil, err
	}
	return certs[0], key, nil
}

// readCerts reads a PEM certificate file; errors name the file.
func readCerts(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := sign.ParseCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

// readKey reads a PEM private key file; errors name the file.
func readKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := sign.ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func readPublicKey(path string) (crypto.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if der := pemBody(b, "PUBLIC KEY"); der != nil {
		b = der
	}
	pub, err := x509.ParsePKIXPublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return pub, sign.CheckPublicKey(pub)
}

func guestosCommand(out io.Writer) *cobra.Command {
	g := &cobra.Command{Use: "guestos", Short: "Build signed guest OS bundles"}
	var r BuildRequest
	var sf signerFlags
	var ociLayout, ociRef, salt string
	build := &cobra.Command{
		Use: "build", Short: "Build a signed guest OS bundle from a root filesystem directory or an OCI image layout", Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			key, chain, closeFn, err := sf.load()
			if err != nil {
				return err
			}
			defer closeFn()
			if salt != "" {
				if r.Salt, err = hex.DecodeString(salt); err != nil {
					return fmt.Errorf("--salt: %w", err)
				}
			}
			switch {
			case (r.RootFS == "") == (ociLayout == ""):
				return fmt.Errorf("give exactly one of --rootfs and --oci-layout")
			case ociLayout != "":
				tmp, err := os.MkdirTemp("", "cmlsign-rootfs-")
				if err != nil {
					return err
				}
				defer os.RemoveAll(tmp)
				img, err := UnpackOCI(ociLayout, ociRef, tmp)
				if err != nil {
					return err
				}
				r.RootFS = tmp
				if r.Init == "" {
					r.Init, r.InitParam = img.Init, img.Params
				}
				r.InitEnv = append(img.Env, r.InitEnv...)
			}
			m, err := BuildGuestOS(r, key, chain)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "built guest OS %s %d in %s: %s, %d bytes, verity root %s, signed by %q\n", m.GetName(), m.GetVersion(), r.Out,
				m.GetMounts()[0].GetImageFile(), m.GetMounts()[0].GetImageSize(), m.GetMounts()[0].GetVerityRootHash(), chain[0].Subject.CommonName)
			return nil
		},
	}
	f := build.Flags()
	f.StringVar(&r.Name, "name", "", "guest OS name")
	f.Uint64Var(&r.Version, "version", 0, "guest OS version (must grow with every release)")
	f.StringVar(&r.RootFS, "rootfs", "", "root filesystem directory")
	f.StringVar(&ociLayout, "oci-layout", "", "OCI image layout directory (skopeo copy oci:DIR, podman save --format oci-dir) or docker save tarball")
	f.StringVar(&ociRef, "oci-ref", "", "image in the layout (org.opencontainers.image.ref.name); default: the only one")
	f.StringVar(&r.FSType, "fs", "erofs", "image type: erofs or squashfs")
	f.StringVar(&r.Init, "init", "", "init path (default /sbin/init, or the OCI image's entrypoint)")
	f.StringArrayVar(&r.InitEnv, "env", nil, "KEY=value for init; repeatable")
	f.StringVar(&r.Description, "description", "", "description")
	f.Uint32Var(&r.MinRAM, "min-ram", 0, "smallest ram_limit (MiB) containers of this guest OS may have")
	f.BoolVar(&r.AllRoot, "all-root", false, "make every file owned by root")
	f.StringVar(&salt, "salt", "", "verity salt in hex (default: random)")
	f.StringVar(&r.Out, "out", "", "output directory")
	sf.add(build)
	build.MarkFlagRequired("name")
	build.MarkFlagRequired("version")
	build.MarkFlagRequired("out")
	g.AddCommand(build)
	return g
}

func configCommand(out io.Writer) *cobra.Command {
	var sf signerFlags
	cmd := &cobra.Command{
		Use: "config <file>...", Short: "Sign container configs (writes <file>.sig and <file>.cert)", Args: cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			key, chain, closeFn, err := sf.load()
			if err != nil {
				return err
			}
			defer closeFn()
			for _, p := range args {
				text, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				// Refuse to sign what the device would refuse to load.
				if _, err := config.ParseContainer(p, text); err != nil {
					return err
				}
				if err := sign.SignFile(p, key, chain); err != nil {
					return fmt.Errorf("%s: %w", p, err)
				}
				fmt.Fprintf(out, "signed %s (%s%s, %s%s)\n", p, filepath.Base(p), sign.SigSuffix, filepath.Base(p), sign.CertSuffix)
			}
			return nil
		},
	}
	sf.add(cmd)
	return cmd
}

func verifyCommand(out io.Writer) *cobra.Command {
	var cas []string
	cmd := &cobra.Command{
		Use: "verify <file>...", Short: "Check files' signatures (<file>.sig, <file>.cert) against root CAs, as the device will", Args: cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			var roots []*x509.Certificate
			for _, p := range cas {
				cs, err := readCerts(p)
				if err != nil {
					return err
				}
				roots = append(roots, cs...)
			}
			ts := trust.FromRoots(roots)
			for _, p := range args {
				msg, err1 := os.ReadFile(p)
				sig, err2 := os.ReadFile(p + sign.SigSuffix)
				chain, err3 := os.ReadFile(p + sign.CertSuffix)
				if err1 != nil || err2 != nil || err3 != nil {
					return fmt.Errorf("%s: %v", p, firstErr(err1, err2, err3))
				}
				res, err := ts.Verify(msg, sig, chain, time.Now())
				if err != nil {
					return fmt.Errorf("%s: %w", p, err)
				}
				fmt.Fprintf(out, "%s: OK, signed by %q under %q\n", p, res.Signer, res.Root)
			}
			return nil
		},
	}
	cmd.Flags().StringSliceVar(&cas, "ca", nil, "trusted root CA (PEM); repeatable")
	cmd.MarkFlagRequired("ca")
	return cmd
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func pemBody(b []byte, typ string) []byte {
	if blk, _ := pem.Decode(b); blk != nil && blk.Type == typ {
		return blk.Bytes
	}
	return nil
}

type deviceCert struct {
	sign.CertOptions
	pub any
}

// deviceCertOptions reads a device CSR: its signature must verify, it must
// name the device by a urn:uuid: URI, and it asks either for clientAuth
// (the TLS key) or for nothing (the attestation key, which gets TCG's
// attestation key usage). The CA trusts the provisioning station that the
// second request really came from cmld's restricted TPM key.
func deviceCertOptions(b []byte) (deviceCert, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE REQUEST" {
		return deviceCert{}, errors.New("not a PEM certificate request")
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return deviceCert{}, err
	}
	if err := csr.CheckSignature(); err != nil {
		return deviceCert{}, fmt.Errorf("request signature: %w", err)
	}
	if len(csr.URIs) != 1 || !strings.HasPrefix(csr.URIs[0].String(), "urn:uuid:") {
		return deviceCert{}, errors.New("request does not name a device (one urn:uuid: URI)")
	}
	o := deviceCert{CertOptions: sign.CertOptions{CommonName: csr.Subject.CommonName, URIs: csr.URIs}, pub: csr.PublicKey}
	o.AttestationKey = true
	for _, ext := range csr.Extensions {
		if !ext.Id.Equal(asn1.ObjectIdentifier{2, 5, 29, 37}) {
			continue
		}
		// Only clientAuth may be asked for: a CA must not hand out
		// code-signing or server certificates for device keys.
		var ekus []asn1.ObjectIdentifier
		if _, err := asn1.Unmarshal(ext.Value, &ekus); err != nil || len(ekus) != 1 || !ekus[0].Equal(asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}) {
			return deviceCert{}, errors.New("request asks for extended key usages other than clientAuth")
		}
		o.AttestationKey = false
		o.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	return o, nil
}
