// Package cli implements cmlctl's commands on top of the control API. It
// formats output for people (tables) and programs (--output json) and
// turns every failure into one line; it holds no daemon logic.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/safefile"
	"github.com/cmlproject/cml/internal/sign"
)

// crlCmd is `ca crl`: load (also `ca crl <file>`), list and remove CRLs.
func (a *app) crlCmd() *cobra.Command {
	var issuer string
	load := func(cmd *cobra.Command, args []string) error {
		b, err := readLimited(args[0])
		if err != nil {
			return err
		}
		req := &cmlv1.CRLLoadRequest{Pem: b}
		if issuer != "" {
			if req.IssuerChain, err = readLimited(issuer); err != nil {
				return err
			}
		}
		c, ctx, cancel, err := a.call()
		if err != nil {
			return err
		}
		defer cancel()
		x, err := c.CRLLoad(ctx, req)
		if err != nil {
			return err
		}
		fmt.Fprintf(a.stdout, "loaded CRL of %s (%d revoked)\n", x.GetIssuer(), x.GetRevoked())
		return nil
	}
	crl := &cobra.Command{
		Use:   "crl <crl.pem> | crl load|list|remove",
		Short: "Manage certificate revocation lists (one per trusted issuer)",
		Args:  cobra.ExactArgs(1),
		RunE:  load,
	}
	crl.Flags().StringVar(&issuer, "issuer", "", "PEM chain of an intermediate CA that issued the CRL, up to a trusted CA")
	loadCmd := &cobra.Command{Use: "load <crl.pem>", Short: "Load a CRL signed by a trusted CA; a newer CRL number replaces the stored one", Args: cobra.ExactArgs(1), RunE: load}
	loadCmd.Flags().StringVar(&issuer, "issuer", "", "PEM chain of an intermediate CA that issued the CRL, up to a trusted CA")
	crl.AddCommand(loadCmd, &cobra.Command{
		Use: "list", Short: "List the stored CRLs", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.CRLList(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			var rows [][]string
			for _, l := range x.GetCrls() {
				rows = append(rows, []string{l.GetFingerprint()[:16], l.GetNumber(), strconv.Itoa(int(l.GetRevoked())), time.Unix(l.GetNextUpdateUnix(), 0).UTC().Format(time.RFC3339), l.GetIssuer()})
			}
			return a.table(x, "FINGERPRINT\tNUMBER\tREVOKED\tNEXT UPDATE\tISSUER", rows)
		},
	}, &cobra.Command{
		Use: "remove <fingerprint-prefix|issuer>", Short: "Remove a stored CRL (audited: it can un-revoke certificates)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.CRLRemove(ctx, &cmlv1.CRLRemoveRequest{Ref: proto.String(args[0])})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "removed CRL %s of %s\n", x.GetFingerprint()[:16], x.GetIssuer())
			return nil
		},
	})
	return crl
}

// maxAnswer bounds a reply cmlctl takes: a measurement log of 256 MiB
// and the rest (as cmlverify's attest.MaxAnswer).
const maxAnswer = 257 << 20

// ExecFailed is cmlctl exec's exit status when the command could not be
// run at all (refused, not started by the runtime, connection lost).
const ExecFailed = 125

// DefaultSocket is cmld's default control socket.
const DefaultSocket = "/run/cml/control.sock"

type app struct {
	socket string
	// remote, cert, key, ca: the control API over mutual TLS.
	remote, cert, key, ca string
	output                string
	stdin                 io.Reader
	stdout                io.Writer
	stderr                io.Writer
	conn                  *grpc.ClientConn
	code                  int
	// sessionFile keeps the login's token; token is it, once read.
	sessionFile string
	token       string
	tokenRead   bool
	// p11*: the client key on a PKCS#11 token; signer, once open.
	p11Module, p11Token, p11Key, p11PINFile string
	signer                                  interface{ Close() }
}

func (a *app) client() (cmlv1.ControlClient, error) {
	if a.conn == nil {
		target, creds := "unix://"+a.socket, insecure.NewCredentials()
		if a.remote != "" {
			tc, err := a.remoteTLS()
			if err != nil {
				return nil, err
			}
			target, creds = "dns:///"+a.remote, credentials.NewTLS(tc)
		}
		// Attestation answers carry the whole measurement log (up to 256
		// MiB for a device that ran for years).
		conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxAnswer)),
			grpc.WithChainUnaryInterceptor(a.unarySession), grpc.WithChainStreamInterceptor(a.streamSession))
		if err != nil {
			return nil, err
		}
		a.conn = conn
	}
	return cmlv1.NewControlClient(a.conn), nil
}

// Run runs cmlctl with args and returns the exit code for the process.
func Run(args []string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:           "cmlctl",
		Short:         "Manage the CML container daemon",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	sock := os.Getenv("CML_SOCKET")
	if sock == "" {
		sock = DefaultSocket
	}
	root.PersistentFlags().StringVar(&a.socket, "socket", sock, "cmld control socket ($CML_SOCKET)")
	root.PersistentFlags().StringVar(&a.remote, "remote", os.Getenv("CML_REMOTE"), "a device's remote API, host:port ($CML_REMOTE); with --cert, --key, --ca")
	root.PersistentFlags().StringVar(&a.cert, "cert", os.Getenv("CML_CERT"), "client certificate (PEM) for --remote ($CML_CERT)")
	root.PersistentFlags().StringVar(&a.key, "key", os.Getenv("CML_KEY"), "client key (PEM) for --remote ($CML_KEY)")
	root.PersistentFlags().StringVar(&a.ca, "ca", os.Getenv("CML_CA"), "CA the device's certificate must chain to, for --remote ($CML_CA)")
	root.PersistentFlags().StringVar(&a.p11Module, "pkcs11-module", os.Getenv("CML_PKCS11_MODULE"), "PKCS#11 module holding the client key for --remote, instead of --key ($CML_PKCS11_MODULE)")
	root.PersistentFlags().StringVar(&a.p11Token, "token-label", os.Getenv("CML_TOKEN_LABEL"), "label of the token in --pkcs11-module (default: the first) ($CML_TOKEN_LABEL)")
	root.PersistentFlags().StringVar(&a.p11Key, "key-label", os.Getenv("CML_KEY_LABEL"), "label of the client key on the token ($CML_KEY_LABEL)")
	root.PersistentFlags().StringVar(&a.p11PINFile, "pkcs11-pin-file", "", "read the token's PIN from this file (else asked on the terminal)")
	root.PersistentFlags().StringVar(&a.sessionFile, "session-file", os.Getenv("CML_SESSION_FILE"), "where cmlctl login keeps the session token ($CML_SESSION_FILE; default: per device under $XDG_RUNTIME_DIR)")
	root.PersistentFlags().StringVarP(&a.output, "output", "o", "text", "output format for list, state, config: text or json")
	var confFile string
	root.PersistentFlags().StringVar(&confFile, "config", "", "settings file (name = value: remote, cert, key, ca, pkcs11-module, key-label, ...); default $CML_CONFIG or ~/.config/cml/cmlctl.conf")
	if p, explicit := configPath(args); p != "" {
		if err := loadConfig(root.PersistentFlags(), p, explicit); err != nil {
			return 2, err
		}
	}
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(a.listCmd(), a.createCmd(), a.removeCmd(),
		a.startCmd(), a.stopCmd(), a.killCmd(), a.refCmd("state", "Show a container's state"),
		a.refCmd("config", "Show a container's config"), a.updateConfigCmd(), a.refCmd("freeze", "Freeze a container"),
		a.refCmd("unfreeze", "Thaw a frozen container"), a.execCmd(), a.logsCmd(), a.eventsCmd(), a.guestOSCmd(), a.caCmd(), a.deviceCmd(), a.networkCmd(),
		a.wipeCmd(), a.changePinCmd(), a.tokenCmd(), a.auditCmd(), a.whoamiCmd(), a.userCmd(), a.loginCmd(), a.logoutCmd(), a.sessionCmd(), a.clientCmd(), a.backupCmd())
	err := root.Execute()
	if a.conn != nil {
		a.conn.Close()
	}
	if a.signer != nil {
		a.signer.Close()
	}
	if err != nil && strings.HasPrefix(err.Error(), "unknown ") || err != nil && strings.Contains(err.Error(), "accepts ") {
		return 2, err
	}
	return a.code, err
}

// call returns the client and a bounded context for one unary call.
func (a *app) call() (cmlv1.ControlClient, context.Context, context.CancelFunc, error) {
	c, err := a.client()
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	return c, ctx, cancel, nil
}

// rpc runs fn with the client and a bounded context.
func (a *app) rpc(fn func(ctx context.Context, c cmlv1.ControlClient) error) error {
	c, ctx, cancel, err := a.call()
	if err != nil {
		return err
	}
	defer cancel()
	return fn(ctx, c)
}

// table prints the reply of a read-only call: as JSON with --output json,
// else as a table with header and one row per element.
func (a *app) table(reply proto.Message, header string, rows [][]string) error {
	if a.output == "json" {
		return a.json(reply)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func (a *app) json(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", UseEnumNumbers: false}.Marshal(m)
	if err != nil {
		return err
	}
	fmt.Fprintln(a.stdout, string(b))
	return nil
}

func (a *app) listCmd() *cobra.Command {
	return &cobra.Command{
		Use: "list", Short: "List containers", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := c.List(ctx, &cmlv1.ListRequest{})
			if err != nil {
				return err
			}
			var rows [][]string
			for _, ct := range resp.GetContainers() {
				pid := "-"
				if ct.GetPid() > 0 {
					pid = strconv.Itoa(int(ct.GetPid()))
				}
				gos := ct.GetGuestOs()
				if v := ct.GetGuestosVersion(); v > 0 {
					gos += " " + strconv.FormatUint(v, 10)
				}
				rows = append(rows, []string{ct.GetName(), ct.GetUuid(), ct.GetState().String(), gos, ct.GetTrustLevel().String(), storageText(ct), pid, ct.GetReason()})
			}
			return a.table(resp, "NAME\tUUID\tSTATE\tGUEST OS\tTRUST\tSTORAGE\tPID\tREASON", rows)
		},
	}
}

// configFile is a config file's exact bytes plus, when cmlsign signed it,
// the signature and chain next to it (<file>.sig, <file>.cert).
type configFile struct{ text, sig, cert []byte }

func readConfig(path string) (*configFile, error) {
	read := safefile.ReadFile
	text, err := read(path, config.MaxFileSize)
	if err != nil {
		return nil, err
	}
	// Parse here too, so a typo is reported before anything is sent.
	if _, err := config.ParseContainer(path, text); err != nil {
		return nil, err
	}
	cf := &configFile{text: text}
	if cf.sig, err = read(path+sign.SigSuffix, sign.MaxSignatureSize); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if cf.cert, err = read(path+sign.CertSuffix, sign.MaxChainSize); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return cf, nil
}

func (a *app) createCmd() *cobra.Command {
	return &cobra.Command{
		Use: "create <config-file>", Short: "Create a container from a config file", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cf, err := readConfig(args[0])
			if err != nil {
				return err
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			ct, err := c.Create(ctx, &cmlv1.CreateRequest{ConfigText: cf.text, Signature: cf.sig, Certificate: cf.cert, Source: proto.String(filepath.Base(args[0]))})
			if err != nil {
				return err
			}
			return a.printContainer(ct)
		},
	}
}

func (a *app) printContainer(ct *cmlv1.Container) error {
	if a.output == "json" {
		return a.json(ct)
	}
	fmt.Fprintf(a.stdout, "%s %s %s %s %s", ct.GetName(), ct.GetUuid(), ct.GetState(), ct.GetTrustLevel(), storageText(ct))
	if ct.GetReason() != "" {
		fmt.Fprintf(a.stdout, " (%s)", ct.GetReason())
	}
	fmt.Fprintln(a.stdout)
	return nil
}

func (a *app) refCmd(name, short string) *cobra.Command {
	return &cobra.Command{
		Use: name + " <name|uuid>", Short: short, Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			ref := &cmlv1.ContainerRef{NameOrUuid: proto.String(args[0])}
			var ct *cmlv1.Container
			switch name {
			case "state":
				ct, err = c.State(ctx, ref)
			case "freeze":
				ct, err = c.Freeze(ctx, ref)
			case "unfreeze":
				ct, err = c.Unfreeze(ctx, ref)
			case "config":
				cfg, err := c.Config(ctx, ref)
				if err != nil {
					return err
				}
				if a.output == "json" {
					return a.json(cfg)
				}
				b, _ := prototext.MarshalOptions{Multiline: true}.Marshal(cfg)
				_, err = a.stdout.Write(b)
				return err
			}
			if err != nil {
				return err
			}
			return a.printContainer(ct)
		},
	}
}

func (a *app) stopCmd() *cobra.Command {
	var timeout uint32
	cmd := &cobra.Command{
		Use: "stop <name|uuid>", Short: "Stop a container: SIGTERM, then SIGKILL after the timeout", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			ct, err := c.Stop(ctx, &cmlv1.StopRequest{NameOrUuid: proto.String(args[0]), TimeoutSeconds: proto.Uint32(timeout)})
			if err != nil {
				return err
			}
			return a.printContainer(ct)
		},
	}
	cmd.Flags().Uint32Var(&timeout, "timeout", 0, "seconds to wait after SIGTERM (default: the config's stop_timeout)")
	return cmd
}

func (a *app) killCmd() *cobra.Command {
	var sig string
	cmd := &cobra.Command{
		Use: "kill <name|uuid>", Short: "Send a signal to a container's init", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSignal(sig)
			if err != nil {
				return err
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			_, err = c.Kill(ctx, &cmlv1.KillRequest{NameOrUuid: proto.String(args[0]), Signal: proto.Int32(int32(n))})
			return err
		},
	}
	cmd.Flags().StringVarP(&sig, "signal", "s", "KILL", "signal name or number")
	return cmd
}

func parseSignal(s string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return n, nil
	}
	name := strings.TrimPrefix(strings.ToUpper(s), "SIG")
	for i := 1; i < 65; i++ {
		if strings.EqualFold(strings.TrimPrefix(unixSignalName(syscall.Signal(i)), "SIG"), name) {
			return i, nil
		}
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

func (a *app) updateConfigCmd() *cobra.Command {
	return &cobra.Command{
		Use: "update-config <name|uuid> <config-file>", Short: "Replace a container's config (applies at next start)", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			cf, err := readConfig(args[1])
			if err != nil {
				return err
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			ct, err := c.UpdateConfig(ctx, &cmlv1.UpdateConfigRequest{NameOrUuid: proto.String(args[0]), ConfigText: cf.text, Signature: cf.sig, Certificate: cf.cert, Source: proto.String(filepath.Base(args[1]))})
			if err != nil {
				return err
			}
			return a.printContainer(ct)
		},
	}
}

func (a *app) logsCmd() *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use: "logs <name|uuid>", Short: "Show a container's console output", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer cancel()
			st, err := c.Logs(ctx, &cmlv1.LogsRequest{NameOrUuid: proto.String(args[0]), Follow: proto.Bool(follow)})
			if err != nil {
				return err
			}
			for {
				m, err := st.Recv()
				if err == io.EOF || ctx.Err() != nil {
					return nil
				}
				if err != nil {
					return err
				}
				a.stdout.Write(m.GetData())
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	return cmd
}

func (a *app) eventsCmd() *cobra.Command {
	return &cobra.Command{
		Use: "events [name|uuid]", Short: "Stream container state changes (current state first) and security alerts", Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer cancel()
			req := &cmlv1.EventsRequest{}
			if len(args) == 1 {
				req.NameOrUuid = proto.String(args[0])
			}
			st, err := c.Events(ctx, req)
			if err != nil {
				return err
			}
			for {
				e, err := st.Recv()
				if err == io.EOF || ctx.Err() != nil {
					return nil
				}
				if err != nil {
					return err
				}
				if a.output == "json" {
					b, _ := protojson.Marshal(e)
					fmt.Fprintln(a.stdout, string(b))
					continue
				}
				ct := e.GetContainer()
				t := time.Unix(0, e.GetTimeUnixNano()).Format(time.RFC3339Nano)
				if e.Alert != nil {
					fmt.Fprintf(a.stdout, "%s ALERT %s\n", t, e.GetAlert())
					continue
				}
				line := fmt.Sprintf("%s %s %s", t, ct.GetName(), ct.GetState())
				if ct.GetReason() != "" {
					line += " (" + ct.GetReason() + ")"
				}
				fmt.Fprintln(a.stdout, line)
			}
		},
	}
}

func (a *app) guestOSCmd() *cobra.Command {
	g := &cobra.Command{Use: "guestos", Short: "Manage installed guest OSes"}
	var progress bool
	g.AddCommand(&cobra.Command{
		Use: "list", Short: "List installed guest OSes", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := c.GuestOSList(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			var rows [][]string
			for _, o := range resp.GetGuestos() {
				rows = append(rows, []string{o.GetName(), strconv.FormatUint(o.GetVersion(), 10), strconv.FormatUint(o.GetSize(), 10), o.GetTrustLevel().String(), o.GetSigner(), strings.Join(o.GetUsedBy(), ",")})
			}
			return a.table(resp, "NAME\tVERSION\tSIZE\tTRUST\tSIGNER\tUSED BY", rows)
		},
	}, &cobra.Command{
		Use: "install <dir|https://url/>", Short: "Install a signed guest OS bundle (guestos.conf, .sig, .cert, images) from a directory or an https URL", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &cmlv1.GuestOSInstallRequest{}
			if strings.Contains(args[0], "://") {
				req.Url = proto.String(args[0])
			} else {
				dir, err := filepath.Abs(args[0])
				if err != nil {
					return err
				}
				req.Dir = proto.String(dir)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			st, err := c.GuestOSInstall(ctx, req)
			if err != nil {
				return err
			}
			show := progress
			if f, ok := a.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
				show = true
			}
			lastPhase := ""
			for {
				p, err := st.Recv()
				if err != nil {
					if lastPhase != "" {
						fmt.Fprintln(a.stderr)
					}
					return err
				}
				if o := p.GetGuestos(); o != nil {
					if lastPhase != "" {
						fmt.Fprintln(a.stderr)
					}
					fmt.Fprintf(a.stdout, "installed guestos %s %d (%d bytes, %s by %q)\n", o.GetName(), o.GetVersion(), o.GetSize(), o.GetTrustLevel(), o.GetSigner())
					return nil
				}
				if !show {
					continue
				}
				if p.GetPhase() != lastPhase && lastPhase != "" {
					fmt.Fprintln(a.stderr)
				}
				lastPhase = p.GetPhase()
				fmt.Fprintf(a.stderr, "\r%-8s %7.1f / %.1f MiB", p.GetPhase(), float64(p.GetDoneBytes())/(1<<20), float64(p.GetTotalBytes())/(1<<20))
			}
		},
	}, &cobra.Command{
		Use: "remove <name> <version>", Short: "Remove an installed guest OS version no container uses", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := strconv.ParseUint(args[1], 10, 64)
			if err != nil {
				return fmt.Errorf("version %q is not a number", args[1])
			}
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			_, err = c.GuestOSRemove(ctx, &cmlv1.GuestOSRemoveRequest{Name: proto.String(args[0]), Version: proto.Uint64(v)})
			return err
		},
	})
	if install, _, err := g.Find([]string{"install"}); err == nil {
		install.Flags().BoolVar(&progress, "progress", false, "show progress on stderr even when it is not a terminal")
	}
	return g
}

func (a *app) execCmd() *cobra.Command {
	var tty bool
	var env []string
	cmd := &cobra.Command{
		Use: "exec [--tty] <name|uuid> -- <command> [args...]", Short: "Run a command in a running container; exit status is the command's, or 125 when it could not be run", Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			code, err := a.exec(c, args[0], args[1:], env, tty)
			a.code = code
			if err != nil {
				// The command did not run (or its outcome is unknown):
				// 125, never a code the command itself could have
				// returned, as docker and podman do.
				a.code = ExecFailed
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "allocate a terminal")
	cmd.Flags().StringArrayVarP(&env, "env", "e", nil, "extra environment KEY=value")
	return cmd
}

func (a *app) exec(c cmlv1.ControlClient, ref string, args, env []string, tty bool) (int, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := c.Exec(ctx)
	if err != nil {
		return 0, err
	}
	start := &cmlv1.ExecStart{NameOrUuid: proto.String(ref), Args: args, Env: env, Tty: proto.Bool(tty)}
	inFile, isFile := a.stdin.(*os.File)
	if tty && isFile && term.IsTerminal(int(inFile.Fd())) {
		if w, h, err := term.GetSize(int(inFile.Fd())); err == nil {
			start.Rows, start.Cols = proto.Uint32(uint32(h)), proto.Uint32(uint32(w))
		}
		old, err := term.MakeRaw(int(inFile.Fd()))
		if err == nil {
			defer term.Restore(int(inFile.Fd()), old)
		}
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if w, h, err := term.GetSize(int(inFile.Fd())); err == nil {
					st.Send(&cmlv1.ExecRequest{Msg: &cmlv1.ExecRequest_Resize{Resize: &cmlv1.Resize{Rows: proto.Uint32(uint32(h)), Cols: proto.Uint32(uint32(w))}}})
				}
			}
		}()
	}
	if err := st.Send(&cmlv1.ExecRequest{Msg: &cmlv1.ExecRequest_Start{Start: start}}); err != nil {
		return 0, err
	}
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := a.stdin.Read(buf)
			if n > 0 {
				if st.Send(&cmlv1.ExecRequest{Msg: &cmlv1.ExecRequest_Stdin{Stdin: append([]byte(nil), buf[:n]...)}}) != nil {
					return
				}
			}
			if err != nil {
				st.Send(&cmlv1.ExecRequest{Msg: &cmlv1.ExecRequest_StdinEof{StdinEof: true}})
				return
			}
		}
	}()
	for {
		m, err := st.Recv()
		if err != nil {
			if err == io.EOF {
				return 1, fmt.Errorf("exec: stream ended without an exit status")
			}
			return 0, err
		}
		switch x := m.GetMsg().(type) {
		case *cmlv1.ExecResponse_Stdout:
			a.stdout.Write(x.Stdout)
		case *cmlv1.ExecResponse_Stderr:
			a.stderr.Write(x.Stderr)
		case *cmlv1.ExecResponse_ExitStatus:
			return int(x.ExitStatus), nil
		}
	}
}

func (a *app) caCmd() *cobra.Command {
	ca := &cobra.Command{Use: "ca", Short: "Manage the trusted CAs: vendor CAs (set at provisioning) and owner CAs, and CRLs"}
	ca.AddCommand(&cobra.Command{
		Use: "list", Short: "List trusted root CAs", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := c.CAList(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			var rows [][]string
			for _, x := range resp.GetCas() {
				kind := "owner"
				if x.GetVendor() {
					kind = "vendor"
				}
				rows = append(rows, []string{kind, x.GetFingerprint()[:16], x.GetSubject(), time.Unix(x.GetNotAfterUnix(), 0).UTC().Format(time.DateOnly)})
			}
			return a.table(resp, "KIND\tFINGERPRINT\tSUBJECT\tNOT AFTER", rows)
		},
	}, &cobra.Command{
		Use: "register <ca.pem>", Short: "Trust an owner root CA (configs and, with locally_signed_images, guest OSes signed under it)", Args: cobra.ExactArgs(1),
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
			x, err := c.CARegister(ctx, &cmlv1.CARegisterRequest{Pem: b})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "registered owner CA %s %s\n", x.GetFingerprint()[:16], x.GetSubject())
			return nil
		},
	}, &cobra.Command{
		Use: "remove <fingerprint>", Short: "Stop trusting an owner CA (fingerprint prefix from ca list)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.CARemove(ctx, &cmlv1.CARemoveRequest{Fingerprint: proto.String(args[0])})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "removed owner CA %s %s\n", x.GetFingerprint()[:16], x.GetSubject())
			return nil
		},
	}, a.crlCmd())
	return ca
}
