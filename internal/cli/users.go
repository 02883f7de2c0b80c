package cli

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

func (a *app) printAccount(x *cmlv1.AccountInfo) error {
	if a.output == "json" {
		return a.json(x)
	}
	var uids []string
	for _, u := range x.GetLocalUids() {
		uids = append(uids, strconv.Itoa(int(u)))
	}
	state := "enabled"
	if x.GetLocked() {
		state = "locked"
		if r := x.GetLockReason(); r != "" {
			state += " (" + r + ")"
		}
	}
	pw := "no"
	switch {
	case x.GetPasswordExpired():
		pw = "expired"
	case x.GetHasPassword():
		pw = "yes"
	}
	fmt.Fprintf(a.stdout, "%s roles=%s containers=%s local-uids=%s cert-names=%s password=%s failed-logins=%d %s\n", x.GetName(), strings.Join(x.GetRoles(), ","),
		strings.Join(x.GetContainers(), ","), strings.Join(uids, ","), strings.Join(x.GetCertNames(), ","), pw, x.GetFailedLogins(), state)
	return nil
}

func (a *app) whoamiCmd() *cobra.Command {
	return &cobra.Command{
		Use: "whoami", Short: "Show the caller's account and roles", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			x, err := c.Whoami(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			return a.printAccount(x)
		},
	}
}

func (a *app) userCmd() *cobra.Command {
	u := &cobra.Command{Use: "user", Short: "Manage cmld's accounts and their roles (administrators)"}
	var roles, containers, certNames []string
	var uids []int
	var withPassword bool
	var pwFile string
	add := &cobra.Command{
		Use: "add <name>", Short: "Add an account (--role administrator|auditor|user, --uid for local callers, --container for users)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			req := &cmlv1.AccountInfo{Name: proto.String(args[0]), Roles: roles, Containers: containers, CertNames: certNames}
			if withPassword || pwFile != "" {
				pw, err := newPassword(pwFile)
				if err != nil {
					return err
				}
				defer zero(pw)
				req.Password = proto.String(string(pw))
			}
			for _, u := range uids {
				req.LocalUids = append(req.LocalUids, int32(u))
			}
			x, err := c.UserAdd(ctx, req)
			if err != nil {
				return err
			}
			return a.printAccount(x)
		},
	}
	add.Flags().StringSliceVar(&roles, "role", nil, "role (repeat or comma-separate)")
	add.Flags().StringSliceVar(&containers, "container", nil, "container a user may operate")
	add.Flags().IntSliceVar(&uids, "uid", nil, "local uid mapped to the account")
	add.Flags().StringSliceVar(&certNames, "cert-name", nil, "common name of a client certificate (under an owner CA) for the remote API")
	add.Flags().BoolVar(&withPassword, "password", false, "ask for an initial password (its owner must change it at the first login)")
	add.Flags().StringVar(&pwFile, "password-file", "", "read the initial password from this file")
	list := &cobra.Command{
		Use: "list", Short: "List accounts", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			l, err := c.UserList(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.json(l)
			}
			for _, x := range l.GetAccounts() {
				a.printAccount(x)
			}
			return nil
		},
	}
	remove := &cobra.Command{
		Use: "remove <name>", Short: "Remove an account", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			_, err = c.UserRemove(ctx, &cmlv1.AccountRef{Name: proto.String(args[0])})
			return err
		},
	}
	set := func(use, short string, f func(*cobra.Command, *cmlv1.UserSetRequest)) *cobra.Command {
		return &cobra.Command{
			Use: use, Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, ctx, cancel, err := a.call()
				if err != nil {
					return err
				}
				defer cancel()
				req := &cmlv1.UserSetRequest{Name: proto.String(args[0])}
				f(cmd, req)
				x, err := c.UserSet(ctx, req)
				if err != nil {
					return err
				}
				return a.printAccount(x)
			},
		}
	}
	var setRoles, setContainers []string
	rolesCmd := set("roles <name>", "Set an account's roles (--role) and a user's containers (--container)", func(cmd *cobra.Command, r *cmlv1.UserSetRequest) {
		if cmd.Flags().Changed("role") {
			r.Roles, r.SetRoles = setRoles, proto.Bool(true)
		}
		if cmd.Flags().Changed("container") {
			r.Containers, r.SetContainers = setContainers, proto.Bool(true)
		}
	})
	rolesCmd.Flags().StringSliceVar(&setRoles, "role", nil, "roles")
	rolesCmd.Flags().StringSliceVar(&setContainers, "container", nil, "containers of a user")
	lock := set("lock <name>", "Lock an account", func(_ *cobra.Command, r *cmlv1.UserSetRequest) { r.Locked = proto.Bool(true) })
	unlock := set("unlock <name>", "Unlock an account", func(_ *cobra.Command, r *cmlv1.UserSetRequest) { r.Locked = proto.Bool(false) })
	u.AddCommand(add, list, remove, rolesCmd, lock, unlock, a.passwdCmd(), a.policyCmd())
	return u
}
