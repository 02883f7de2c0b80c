package cli

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/safefile"
	"github.com/cmlproject/cml/internal/sign"
)

func (a *app) deviceCmd() *cobra.Command {
	dev := &cobra.Command{Use: "device", Short: "Show and provision the device's TPM-held identity; answer attestation challenges"}
	info := &cobra.Command{
		Use: "info", Short: "Show the device UUID, TPM, certificates and whether provisioning ended", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.DeviceInfo(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			return a.deviceInfo(x)
		},
	}
	var attestationKey bool
	var out string
	csr := &cobra.Command{
		Use: "csr", Short: "Print a certificate request for the TLS key (or, with --attestation, the attestation key), signed in the TPM", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			key := cmlv1.DeviceCSRRequest_TLS
			if attestationKey {
				key = cmlv1.DeviceCSRRequest_ATTESTATION
			}
			x, err := c.DeviceCSR(ctx, &cmlv1.DeviceCSRRequest{Key: key.Enum()})
			if err != nil {
				return err
			}
			return a.write(out, x.GetPem())
		},
	}
	csr.Flags().BoolVar(&attestationKey, "attestation", false, "request for the attestation key instead of the TLS key")
	csr.Flags().StringVarP(&out, "file", "f", "", "write to this file instead of standard output")
	var replace bool
	cert := &cobra.Command{
		Use: "cert <cert.pem>", Short: "Install the certificate a fleet CA issued for the TLS or attestation key (chain allowed)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := readLimited(args[0])
			if err != nil {
				return err
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.DeviceCert(ctx, &cmlv1.DeviceCertRequest{Pem: b, Replace: proto.Bool(replace)})
			if err != nil {
				return err
			}
			certs, _ := sign.ParseCertificates(b)
			fmt.Fprintf(a.stdout, "installed certificate %q issued by %q\n", certs[0].Subject.CommonName, certs[0].Issuer.CommonName)
			if !x.GetProvisioned() {
				fmt.Fprintln(a.stdout, "device is not provisioned yet: run `cmlctl device provisioned` once both keys are certified")
			}
			return nil
		},
	}
	cert.Flags().BoolVar(&replace, "replace", false, "replace a certificate after provisioning ended (audited)")
	provisioned := &cobra.Command{
		Use: "provisioned", Short: "End provisioning: from now on identity changes need --replace and are audited", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.DeviceProvisioned(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "device %s is provisioned\n", x.GetDeviceUuid())
			return nil
		},
	}
	var nonceHex, pcrList string
	attest := &cobra.Command{
		Use:   "attest",
		Short: "Answer an attestation challenge: quote, PCRs, measurement log and certificates, as JSON for cmlverify",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			nonce, err := hex.DecodeString(nonceHex)
			if nonceHex == "" {
				nonce = make([]byte, 32)
				_, err = rand.Read(nonce)
			}
			if err != nil {
				return fmt.Errorf("--nonce: not hex")
			}
			var pcrs []uint32
			for _, f := range strings.Split(pcrList, ",") {
				if f == "" {
					continue
				}
				n, err := strconv.ParseUint(f, 10, 8)
				if err != nil {
					return fmt.Errorf("--pcrs: %q is not a PCR number", f)
				}
				pcrs = append(pcrs, uint32(n))
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.Attest(ctx, &cmlv1.AttestRequest{Nonce: nonce, Pcrs: pcrs})
			if err != nil {
				return err
			}
			b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(x)
			if err != nil {
				return err
			}
			if nonceHex == "" {
				fmt.Fprintf(a.stderr, "nonce %x\n", nonce)
			}
			return a.write(out, append(b, '\n'))
		},
	}
	attest.Flags().StringVar(&nonceHex, "nonce", "", "the verifier's challenge, hex (8 to 64 bytes); default: a random one, printed on stderr")
	attest.Flags().StringVar(&pcrList, "pcrs", "", "further PCRs to quote, e.g. 0,2,4,7 (the measurement PCR is always quoted)")
	attest.Flags().StringVarP(&out, "file", "f", "", "write to this file instead of standard output")
	var wipePIN string
	var yes bool
	wipe := &cobra.Command{
		Use: "wipe", Short: "Stop and remove every container, destroying encrypted containers' keys in their tokens (audited before it starts)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !yes {
				return fmt.Errorf("this destroys every container and its data: add --yes")
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			req := &cmlv1.DeviceWipeRequest{}
			if wipePIN != "" {
				if req.Pin, err = readPIN("", wipePIN); err != nil {
					return err
				}
				defer zero(req.Pin)
			}
			r, err := c.DeviceWipe(ctx, req)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.json(r)
			}
			fmt.Fprintf(a.stdout, "removed %d containers: %s\n%s\n", len(r.GetRemoved()), strings.Join(r.GetRemoved(), ", "), r.GetNote())
			return nil
		},
	}
	wipe.Flags().StringVar(&wipePIN, "pin-file", "", "the PKCS#11 token's PIN, from this file (needed to destroy keys on it)")
	wipe.Flags().BoolVar(&yes, "yes", false, "confirm")
	dev.AddCommand(info, csr, cert, provisioned, attest, wipe)
	return dev
}

func (a *app) deviceInfo(x *cmlv1.DeviceIdentity) error {
	if a.output == "json" {
		return a.json(x)
	}
	state := "not provisioned"
	if x.GetProvisioned() {
		state = "provisioned"
	}
	tls := "self-signed"
	if !x.GetTlsSelfSigned() {
		tls = certSummary(x.GetTlsCertificate())
	}
	ak := "none"
	if len(x.GetAttestationCertificate()) > 0 {
		ak = certSummary(x.GetAttestationCertificate())
	}
	fmt.Fprintf(a.stdout, "device:       %s\nname:         %s\nstate:        %s\ntpm:          %s\npcr:          %d\ntls cert:     %s\nattestation:  %s\n",
		x.GetDeviceUuid(), x.GetCommonName(), state, x.GetTpm(), x.GetMeasurementPcr(), tls, ak)
	return nil
}

func certSummary(b []byte) string {
	certs, err := sign.ParseCertificates(b)
	if err != nil {
		return "unreadable: " + err.Error()
	}
	return fmt.Sprintf("%q issued by %q, until %s", certs[0].Subject.CommonName, certs[0].Issuer.CommonName, certs[0].NotAfter.UTC().Format("2006-01-02"))
}

// write writes b to path atomically, or to standard output.
func (a *app) write(path string, b []byte) error {
	if path == "" {
		_, err := a.stdout.Write(b)
		return err
	}
	return atomicfile.Write(path, b, 0o644)
}

func readLimited(p string) ([]byte, error) {
	return safefile.ReadFile(p, 4<<20)
}
