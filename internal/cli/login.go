package cli

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/safefile"
)

// sessionPath is where cmlctl keeps the session token of one device
// (--session-file, $CML_SESSION_FILE): by default under
// $XDG_RUNTIME_DIR (memory, the user's own), else the user cache
// directory, one file per socket or remote address. The token works only
// from the uid or certificate that logged in.
func (a *app) sessionPath() string {
	if a.sessionFile != "" {
		return a.sessionFile
	}
	dir := os.Getenv("XDG_RUNTIME_DIR")
	if dir == "" {
		if c, err := os.UserCacheDir(); err == nil {
			dir = c
		} else {
			dir = os.TempDir()
		}
	}
	target := "unix:" + a.socket
	if a.remote != "" {
		target = "remote:" + a.remote + ":" + a.cert
	}
	h := sha256.Sum256([]byte(target))
	return filepath.Join(dir, "cml", "session-"+hex.EncodeToString(h[:8]))
}

func (a *app) sessionToken() string {
	if !a.tokenRead {
		a.tokenRead = true
		if b, err := safefile.ReadFile(a.sessionPath(), 4096); err == nil {
			a.token = strings.TrimSpace(string(b))
		}
	}
	return a.token
}

func (a *app) saveSession(tok string) error {
	p := a.sessionPath()
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	a.token, a.tokenRead = tok, true
	return atomicfile.Write(p, []byte(tok+"\n"), 0o600)
}

func (a *app) dropSession() {
	os.Remove(a.sessionPath())
	a.token, a.tokenRead = "", true
}

// withSession adds the session token, if there is one, to every call.
func (a *app) withSession(ctx context.Context) context.Context {
	if tok := a.sessionToken(); tok != "" {
		return metadata.AppendToOutgoingContext(ctx, "cml-session", tok)
	}
	return ctx
}

func (a *app) unarySession(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return inv(a.withSession(ctx), method, req, reply, cc, opts...)
}

func (a *app) streamSession(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, st grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return st(a.withSession(ctx), desc, cc, method, opts...)
}

// newPassword asks for a new password twice (or reads it from file).
func newPassword(file string) ([]byte, error) {
	pw, err := readSecret("new password", "new password: ", file, false)
	if err != nil || file != "" {
		return pw, err
	}
	again, err := readSecret("new password", "new password again: ", "", false)
	defer zero(again)
	if err != nil {
		return nil, err
	}
	if string(again) != string(pw) {
		zero(pw)
		return nil, fmt.Errorf("the two new passwords differ")
	}
	return pw, nil
}

func (a *app) loginCmd() *cobra.Command {
	var pwFile, newFile string
	cmd := &cobra.Command{
		Use:   "login [account]",
		Short: "Log in with a password (remotely: in addition to the certificate); unlocks a locked session",
		Long: "Log in and keep the session token for later commands (see --session-file). Without an account name, the one the\n" +
			"caller's uid or certificate maps to. An expired password is replaced in the same step.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				req := &cmlv1.LoginRequest{}
				if len(args) == 1 {
					req.Name = proto.String(args[0])
				}
				pw, err := readSecret("password", "password: ", pwFile, false)
				if err != nil {
					return err
				}
				defer zero(pw)
				req.Password = proto.String(string(pw))
				resp, err := c.Login(ctx, req)
				if status.Code(err) == codes.FailedPrecondition && strings.Contains(err.Error(), "expired") {
					fmt.Fprintln(a.stderr, "The password has expired; choose a new one.")
					np, perr := newPassword(newFile)
					if perr != nil {
						return perr
					}
					defer zero(np)
					req.NewPassword = proto.String(string(np))
					resp, err = c.Login(ctx, req)
				}
				if err != nil {
					return err
				}
				if old := a.sessionToken(); old != "" && old != resp.GetToken() {
					// Logged in anew (another account, or the old session
					// had ended): the session the file held ends, rather
					// than linger until its idle lock.
					c.SessionEnd(ctx, &cmlv1.SessionRef{})
				}
				if err := a.saveSession(resp.GetToken()); err != nil {
					return fmt.Errorf("logged in, but the session could not be kept: %w", err)
				}
				fmt.Fprintf(a.stdout, "logged in as %s (session %s)\n", resp.GetAccount().GetName(), resp.GetSession().GetId())
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&pwFile, "password-file", "", "read the password from this file (else asked on the terminal)")
	cmd.Flags().StringVar(&newFile, "new-password-file", "", "read the new password from this file, if the old one has expired")
	return cmd
}

func (a *app) logoutCmd() *cobra.Command {
	return &cobra.Command{
		Use: "logout", Short: "End this session", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if a.sessionToken() == "" {
				return fmt.Errorf("not logged in")
			}
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				_, err := c.SessionEnd(ctx, &cmlv1.SessionRef{})
				a.dropSession()
				if st := status.Code(err); st == codes.Unauthenticated {
					return nil // ended already
				}
				return err
			})
		},
	}
}

func (a *app) printSessions(l *cmlv1.SessionListResponse) error {
	var rows [][]string
	for _, s := range l.GetSessions() {
		state := "active"
		if s.GetLocked() != "" {
			state = "locked (" + s.GetLocked() + ")"
		}
		id := s.GetId()
		if s.GetCurrent() {
			id += " *"
		}
		rows = append(rows, []string{id, s.GetAccount(), s.GetFrom(), time.Unix(s.GetCreatedUnix(), 0).UTC().Format(time.RFC3339),
			time.Unix(s.GetLastUsedUnix(), 0).UTC().Format(time.RFC3339), state})
	}
	return a.table(l, "ID\tACCOUNT\tFROM\tSINCE\tLAST USED\tSTATE", rows)
}

func (a *app) sessionCmd() *cobra.Command {
	s := &cobra.Command{Use: "session", Short: "List, lock and end login sessions"}
	var all bool
	list := &cobra.Command{
		Use: "list", Short: "List your sessions (--all: everyone's, administrators and auditors)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				l, err := c.SessionList(ctx, &cmlv1.SessionListRequest{All: proto.Bool(all)})
				if err != nil {
					return err
				}
				return a.printSessions(l)
			})
		},
	}
	list.Flags().BoolVar(&all, "all", false, "every account's sessions")
	end := &cobra.Command{
		Use: "end <id>", Short: "End a session (yours; administrators: anyone's); its commands and streams end", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				se, err := c.SessionEnd(ctx, &cmlv1.SessionRef{Id: proto.String(args[0])})
				if err != nil {
					return err
				}
				fmt.Fprintf(a.stdout, "ended session %s of %s\n", se.GetId(), se.GetAccount())
				return nil
			})
		},
	}
	lock := &cobra.Command{
		Use: "lock", Short: "Lock this session now (cmlctl login unlocks it)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				se, err := c.SessionLock(ctx, &cmlv1.Empty{})
				if err != nil {
					return err
				}
				fmt.Fprintf(a.stdout, "session %s locked\n", se.GetId())
				return nil
			})
		},
	}
	s.AddCommand(list, end, lock)
	return s
}

func (a *app) passwdCmd() *cobra.Command {
	var oldFile, newFile string
	cmd := &cobra.Command{
		Use:   "passwd [account]",
		Short: "Change your password, or (administrators) set another account's, which its owner must change at the next login",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				req := &cmlv1.PasswdRequest{}
				own := true
				if len(args) == 1 {
					req.Name = proto.String(args[0])
					if me, err := c.Whoami(ctx, &cmlv1.Empty{}); err == nil && me.GetName() != args[0] {
						own = false
					}
				}
				if own {
					old, err := readSecret("password", "current password (empty if none yet): ", oldFile, true)
					if err != nil {
						return err
					}
					defer zero(old)
					req.OldPassword = proto.String(string(old))
				}
				np, err := newPassword(newFile)
				if err != nil {
					return err
				}
				defer zero(np)
				req.NewPassword = proto.String(string(np))
				_, err = c.UserPasswd(ctx, req)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&oldFile, "password-file", "", "read the current password from this file")
	cmd.Flags().StringVar(&newFile, "new-password-file", "", "read the new password from this file")
	return cmd
}

func (a *app) policyCmd() *cobra.Command {
	var minLen, classes, history, maxAge, failures uint32
	var idle time.Duration
	var mfa bool
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Show or set the password, lockout and session policy (setting: administrators)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				req := &cmlv1.AccessPolicy{}
				f := cmd.Flags()
				u32 := func(name string, v uint32) *uint32 {
					if f.Changed(name) {
						return proto.Uint32(v)
					}
					return nil
				}
				req.MinLength, req.MinClasses, req.History = u32("min-length", minLen), u32("min-classes", classes), u32("history", history)
				req.MaxAgeDays, req.MaxFailures = u32("max-age-days", maxAge), u32("max-failures", failures)
				if f.Changed("idle-timeout") {
					if idle < time.Second {
						return fmt.Errorf("--idle-timeout %s is too short", idle)
					}
					req.IdleTimeoutSeconds = proto.Uint32(uint32(idle / time.Second))
				}
				if f.Changed("remote-mfa") {
					req.RemoteMfa = proto.Bool(mfa)
				}
				var p *cmlv1.AccessPolicy
				var err error
				if proto.Size(req) == 0 {
					p, err = c.PolicyGet(ctx, &cmlv1.Empty{})
				} else {
					p, err = c.PolicySet(ctx, req)
				}
				if err != nil {
					return err
				}
				if a.output == "json" {
					return a.json(p)
				}
				fmt.Fprintf(a.stdout, "min-length %d\nmin-classes %d\nhistory %d\nmax-age-days %d\nmax-failures %d\nidle-timeout %s\nremote-mfa %t\nlimited-root-trust %t\n",
					p.GetMinLength(), p.GetMinClasses(), p.GetHistory(), p.GetMaxAgeDays(), p.GetMaxFailures(),
					time.Duration(p.GetIdleTimeoutSeconds())*time.Second, p.GetRemoteMfa(), p.GetLimitedRootTrust())
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.Uint32Var(&minLen, "min-length", 0, "minimum password length (8 to 128)")
	f.Uint32Var(&classes, "min-classes", 0, "character classes a password needs (1 to 4 of lower, upper, digit, other)")
	f.Uint32Var(&history, "history", 0, "passwords not to reuse, the current one included (6 to 24)")
	f.Uint32Var(&maxAge, "max-age-days", 0, "password expiry in days (0: never)")
	f.Uint32Var(&failures, "max-failures", 0, "failed logins in a row that lock an account (1 to 100)")
	f.DurationVar(&idle, "idle-timeout", 0, "inactivity after which a session locks (10s to 24h)")
	f.BoolVar(&mfa, "remote-mfa", false, "remote callers need a password besides their certificate")
	return cmd
}
