package attest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/safefile"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/trust"
)

// ErrFailed is returned when a verdict fails (exit status 1).
var ErrFailed = errors.New("attestation failed")

// NewCommand is cmlverify's command line.
func NewCommand(out io.Writer) *cobra.Command {
	var fleetCAs, trustCAs, refs []string
	var nonceHex, policyFile, device, socket, pcrList string
	var asJSON bool
	var watch time.Duration
	cmd := &cobra.Command{
		Use:   "cmlverify [answer.json]",
		Short: "Verify a CML device's attestation: quote, certificate chain, PCRs, log replay, and the signed guest OS and config of every container",
		Long: `cmlverify checks a device's answer to an attestation challenge and
exits 0 only when every check passes.

Verify a saved answer (from 'cmlctl device attest --nonce HEX'):
  cmlverify --fleet-ca fleet.pem --trust vendor-ca.pem --reference refs/ --nonce HEX answer.json
Fetch from a device (a fresh nonce every time), once or watching:
  cmlverify --fleet-ca fleet.pem --trust vendor-ca.pem --reference refs/ --socket /run/cml/control.sock [--watch 30s]`,
		Args:          cobra.MaximumNArgs(1),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if (len(args) == 1) == (socket != "") {
				return errors.New("give either a saved answer file or --socket to fetch one")
			}
			vf, err := loadVerifier(fleetCAs, trustCAs, refs, policyFile)
			if err != nil {
				return err
			}
			vf.Device = device
			pcrs, err := parsePCRs(pcrList)
			if err != nil {
				return err
			}
			for p := range vf.Policy {
				pcrs = append(pcrs, uint32(p))
			}
			report := func(v *Verdict) error {
				if asJSON {
					b, _ := json.Marshal(v)
					fmt.Fprintln(out, string(b))
				} else {
					printVerdict(out, v)
				}
				if !v.OK {
					return ErrFailed
				}
				return nil
			}
			if len(args) == 1 {
				nonce, err := hex.DecodeString(nonceHex)
				if err != nil || len(nonce) == 0 {
					return errors.New("--nonce: the hex nonce the answer was requested with is required")
				}
				a, err := ReadAnswer(args[0])
				if err != nil {
					v := &Verdict{}
					v.add("answer", false, "%v", err)
					return report(v)
				}
				return report(vf.Verify(a, nonce))
			}
			fetch := func(ctx context.Context) *Verdict {
				nonce := make([]byte, 32)
				rand.Read(nonce)
				a, err := Fetch(ctx, socket, nonce, pcrs)
				if err != nil {
					v := &Verdict{}
					v.add("fetch", false, "%v", err)
					return v
				}
				return vf.Verify(a, nonce)
			}
			ctx := cmd.Context()
			if watch <= 0 {
				return report(fetch(ctx))
			}
			var last string
			for {
				v := fetch(ctx)
				if ctx.Err() != nil {
					return nil // interrupted: not a verdict about the device
				}
				if s := summary(v); s != last {
					if last != "" && !asJSON {
						fmt.Fprintf(out, "--- %s: changed\n", time.Now().UTC().Format(time.RFC3339))
					}
					report(v)
					last = s
				}
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(watch):
				}
			}
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&fleetCAs, "fleet-ca", nil, "CA (PEM) that device attestation-key certificates chain to; repeatable")
	f.StringSliceVar(&trustCAs, "trust", nil, "root CA (PEM) that reference guest OS manifests and configs must be signed under; repeatable")
	f.StringSliceVar(&refs, "reference", nil, "directory of trusted signed guest OS bundles (guestos.conf) and signed container configs; repeatable")
	f.StringVar(&policyFile, "policy", "", "boot PCR policy: lines of '<pcr> <sha256 hex>'")
	f.StringVar(&nonceHex, "nonce", "", "the nonce (hex) a saved answer was requested with")
	f.StringVar(&device, "device", "", "the device UUID the answer must come from")
	f.StringVar(&socket, "socket", "", "fetch the attestation from cmld's control socket")
	f.StringVar(&pcrList, "pcrs", "", "further PCRs to request when fetching, e.g. 0,7")
	f.DurationVar(&watch, "watch", 0, "with --socket: re-attest at this interval and report changes")
	f.BoolVar(&asJSON, "json", false, "print verdicts as JSON (one object per line)")
	cmd.MarkFlagRequired("fleet-ca")
	cmd.MarkFlagRequired("trust")
	cmd.MarkFlagRequired("reference")
	return cmd
}

func loadVerifier(fleetCAs, trustCAs, refs []string, policyFile string) (*Verifier, error) {
	fleet := x509.NewCertPool()
	for _, p := range fleetCAs {
		certs, err := readCertFile(p)
		if err != nil {
			return nil, fmt.Errorf("--fleet-ca %s: %w", p, err)
		}
		for _, c := range certs {
			fleet.AddCert(c)
		}
	}
	var roots []*x509.Certificate
	for _, p := range trustCAs {
		certs, err := readCertFile(p)
		if err != nil {
			return nil, fmt.Errorf("--trust %s: %w", p, err)
		}
		roots = append(roots, certs...)
	}
	ref, err := LoadReference(trust.FromRoots(roots), refs...)
	if err != nil {
		return nil, err
	}
	vf := &Verifier{FleetRoots: fleet, Reference: ref}
	if policyFile != "" {
		if vf.Policy, err = readPolicy(policyFile); err != nil {
			return nil, err
		}
	}
	return vf, nil
}

func readCertFile(p string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	return sign.ParseCertificates(b)
}

func readPolicy(p string) (map[int][]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pol := map[int][]byte{}
	sc := bufio.NewScanner(io.LimitReader(f, 64<<10))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		fs := strings.Fields(line)
		i, err := strconv.Atoi(fs[0])
		var v []byte
		if err == nil && len(fs) == 2 {
			v, err = hex.DecodeString(fs[1])
		}
		if err != nil || len(fs) != 2 || i < 0 || i > 23 || len(v) != 32 {
			return nil, fmt.Errorf("policy %s:%d: want '<pcr 0-23> <sha256 hex>'", p, n)
		}
		pol[i] = v
	}
	return pol, sc.Err()
}

func parsePCRs(s string) ([]uint32, error) {
	var out []uint32
	for _, f := range strings.Split(s, ",") {
		if f == "" {
			continue
		}
		n, err := strconv.ParseUint(f, 10, 8)
		if err != nil || n > 23 {
			return nil, fmt.Errorf("--pcrs: %q is not a PCR number (0 to 23)", f)
		}
		out = append(out, uint32(n))
	}
	return out, nil
}

// ReadAnswer reads a saved answer (protojson, as cmlctl device attest
// writes it), bounded and strictly parsed.
func ReadAnswer(p string) (*cmlv1.Attestation, error) {
	b, err := safefile.ReadFile(p, MaxAnswer)
	if err != nil {
		return nil, err
	}
	a := &cmlv1.Attestation{}
	if err := protojson.Unmarshal(bytes.TrimSpace(b), a); err != nil {
		return nil, fmt.Errorf("answer %s is not a CML attestation: %v", p, err)
	}
	return a, nil
}

// Fetch asks cmld on a control socket for an attestation.
func Fetch(ctx context.Context, socket string, nonce []byte, pcrs []uint32) (*cmlv1.Attestation, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxAnswer)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return cmlv1.NewControlClient(conn).Attest(ctx, &cmlv1.AttestRequest{Nonce: nonce, Pcrs: pcrs})
}

func printVerdict(w io.Writer, v *Verdict) {
	res := "PASS"
	if !v.OK {
		res = "FAIL: " + v.Reason()
	}
	dev := v.Device
	if dev == "" {
		dev = "(unknown)"
	}
	fmt.Fprintf(w, "device %s: %s\n", dev, res)
	for _, c := range v.Checks {
		mark := "ok  "
		if !c.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %-12s %s\n", mark, c.Name, c.Detail)
	}
	for _, c := range v.Containers {
		mark := "ok  "
		if !c.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s container %s (%s) guestos %s %d, %d start(s): %s\n", mark, c.Name, c.UUID, c.GuestOS, c.Version, c.Starts, c.Detail)
	}
}

// summary is what watch mode compares: the outcome and what runs, not the
// per-attestation details (nonces, certificates' details).
func summary(v *Verdict) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%t %s\n", v.OK, v.Reason())
	for _, c := range v.Containers {
		fmt.Fprintf(&b, "%s %s %d %d %t\n", c.UUID, c.GuestOS, c.Version, c.Starts, c.OK)
	}
	return b.String()
}
