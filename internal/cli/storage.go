package cli

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/safefile"
)

// storageText is how a container's data is protected, for text output.
func storageText(ct *cmlv1.Container) string {
	if ct.TokenType == nil {
		return "plain"
	}
	s := fmt.Sprintf("%s/%s", ct.GetCryptfsMode(), strings.ToLower(ct.GetTokenType().String()))
	if ct.GetStorageBackend() != "" {
		s += "/" + ct.GetStorageBackend()
	}
	if ct.GetTokenLocked() {
		s += "/LOCKED"
	}
	return s
}

// readPIN reads a PIN from file, or asks on the terminal without echo.
// A PIN never comes from argv or the environment.
func readPIN(prompt, file string) ([]byte, error) { return readSecret("PIN", prompt, file, false) }

// readSecret reads a PIN or password (what) from file, or asks on the
// terminal without echo; empty answers are refused unless allowEmpty.
func readSecret(what, prompt, file string, allowEmpty bool) ([]byte, error) {
	if file != "" {
		b, err := safefile.ReadFile(file, 4096)
		if err != nil {
			return nil, fmt.Errorf("%s file: %w", what, err)
		}
		b = bytes.TrimRight(b, "\r\n")
		if len(b) == 0 && !allowEmpty {
			return nil, fmt.Errorf("%s file %s is empty", what, file)
		}
		return b, nil
	}
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil || !term.IsTerminal(int(tty.Fd())) {
		flag := "--pin-file"
		if what != "PIN" {
			flag = "--" + strings.ReplaceAll(what, " ", "-") + "-file"
		}
		return nil, fmt.Errorf("a %s is needed and there is no terminal to ask on: use %s", what, flag)
	}
	defer tty.Close()
	fmt.Fprint(tty, prompt)
	b, err := term.ReadPassword(int(tty.Fd()))
	fmt.Fprintln(tty)
	if err != nil {
		return nil, err
	}
	if len(b) == 0 && !allowEmpty {
		return nil, fmt.Errorf("empty %s", what)
	}
	return b, nil
}

func zero(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

// needsPIN asks the daemon whether a container's storage is encrypted.
func needsPIN(ctx context.Context, c cmlv1.ControlClient, ref string) (*cmlv1.Container, bool, error) {
	ct, err := c.State(ctx, &cmlv1.ContainerRef{NameOrUuid: proto.String(ref)})
	if err != nil {
		return nil, false, err
	}
	return ct, ct.GetTokenType() != cmlv1.ContainerTokenType_NONE && ct.TokenType != nil, nil
}

func (a *app) startCmd() *cobra.Command {
	var pinFile string
	cmd := &cobra.Command{
		Use: "start <name|uuid>", Short: "Start a container (an encrypted one asks for its token's PIN)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			// A container the daemon cannot find still goes to Start, so
			// that the refused attempt is audited there.
			ct, enc, _ := needsPIN(ctx, c, args[0])
			ref := &cmlv1.ContainerRef{NameOrUuid: proto.String(args[0])}
			if enc {
				if ref.Pin, err = readPIN(fmt.Sprintf("PIN for %s (%s token): ", ct.GetName(), strings.ToLower(ct.GetTokenType().String())), pinFile); err != nil {
					return err
				}
				defer zero(ref.Pin)
			}
			ct, err = c.Start(ctx, ref)
			if err != nil {
				return err
			}
			return a.printContainer(ct)
		},
	}
	cmd.Flags().StringVar(&pinFile, "pin-file", "", "read the token's PIN from this file (default: ask on the terminal)")
	return cmd
}

func (a *app) removeCmd() *cobra.Command {
	var pinFile string
	cmd := &cobra.Command{
		Use: "remove <name|uuid>", Short: "Remove a stopped container and its data (an encrypted one is wiped: its key destroyed in the token)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withKeyRef(args[0], pinFile, func(ctx context.Context, c cmlv1.ControlClient, ref *cmlv1.ContainerRef) error {
				_, err := c.Remove(ctx, ref)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&pinFile, "pin-file", "", "the token's PIN (PKCS#11 tokens need it to destroy the key), from this file")
	return cmd
}

// withKeyRef calls fn with a reference to the container, carrying a PIN
// only where the daemon needs one to destroy its key (PKCS#11 and USB
// tokens); the PIN is zeroed when fn returns. Remove and wipe share it.
func (a *app) withKeyRef(name, pinFile string, fn func(context.Context, cmlv1.ControlClient, *cmlv1.ContainerRef) error) error {
	c, ctx, cancel, err := a.call()
	if err != nil {
		return err
	}
	defer cancel()
	ref := &cmlv1.ContainerRef{NameOrUuid: proto.String(name)}
	ct, enc, err := needsPIN(ctx, c, name)
	if err != nil {
		return err
	}
	if enc && (ct.GetTokenType() == cmlv1.ContainerTokenType_PKCS11 || ct.GetTokenType() == cmlv1.ContainerTokenType_USB || pinFile != "") {
		if ref.Pin, err = readPIN(fmt.Sprintf("PIN for %s's token (to destroy its key): ", ct.GetName()), pinFile); err != nil {
			return err
		}
		defer zero(ref.Pin)
	}
	return fn(ctx, c, ref)
}

func (a *app) wipeCmd() *cobra.Command {
	var pinFile string
	cmd := &cobra.Command{
		Use:   "wipe <name|uuid>",
		Short: "Stop a container if needed, destroy its key in the token, then its data; the container and its config stay",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withKeyRef(args[0], pinFile, func(ctx context.Context, c cmlv1.ControlClient, ref *cmlv1.ContainerRef) error {
				r, err := c.Wipe(ctx, ref)
				if err != nil {
					return err
				}
				if a.output == "json" {
					return a.json(r)
				}
				fmt.Fprintf(a.stdout, "%s wiped: %s\n", r.GetContainer().GetName(), r.GetNote())
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&pinFile, "pin-file", "", "the token's PIN (PKCS#11 tokens need it to destroy the key), from this file")
	return cmd
}

func (a *app) changePinCmd() *cobra.Command {
	var oldFile, newFile string
	cmd := &cobra.Command{
		Use: "change-pin <name|uuid>", Short: "Change the PIN of a container's token", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			oldPIN, err := readPIN("current PIN: ", oldFile)
			if err != nil {
				return err
			}
			defer zero(oldPIN)
			newPIN, err := readPIN("new PIN: ", newFile)
			if err != nil {
				return err
			}
			defer zero(newPIN)
			if newFile == "" {
				again, err := readPIN("new PIN again: ", "")
				if err != nil {
					return err
				}
				same := bytes.Equal(again, newPIN)
				zero(again)
				if !same {
					return fmt.Errorf("the new PINs differ")
				}
			}
			_, err = c.ChangePin(ctx, &cmlv1.ChangePinRequest{NameOrUuid: proto.String(args[0]), OldPin: oldPIN, NewPin: newPIN})
			return err
		},
	}
	cmd.Flags().StringVar(&oldFile, "pin-file", "", "read the current PIN from this file")
	cmd.Flags().StringVar(&newFile, "new-pin-file", "", "read the new PIN from this file")
	return cmd
}

func (a *app) tokenCmd() *cobra.Command {
	t := &cobra.Command{Use: "token", Short: "Manage containers' tokens"}
	t.AddCommand(&cobra.Command{
		Use: "reset <name|uuid>", Short: "Unlock a token locked after too many wrong PINs (administrators)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			ct, err := c.TokenReset(ctx, &cmlv1.ContainerRef{NameOrUuid: proto.String(args[0])})
			if err != nil {
				return err
			}
			return a.printContainer(ct)
		},
	})
	return t
}
