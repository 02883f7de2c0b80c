package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// networkCmd shows what the kernel enforces for each container's network
// (CR 7.6(1): -o json is the machine-readable form).
func (a *app) networkCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "network [NAME]",
		Short: "Show containers' effective networks: interfaces, addresses, routes, allowed flows and packet counters, read from the kernel",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			req := &cmlv1.NetworkRequest{}
			if len(args) == 1 {
				req.Container = &args[0]
			}
			rep, err := c.Network(ctx, req)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.json(rep)
			}
			st := rep.GetSettings()
			mode := "normal"
			switch {
			case st.GetIsland():
				mode = "island (nothing leaves the device)"
			case st.GetUplinkOnlyVia() != nil:
				v := st.GetUplinkOnlyVia()
				mode = fmt.Sprintf("uplink only via %s %s:%d", strings.ToLower(v.GetProtocol().String()), v.GetAddress(), v.GetPort())
			}
			uplink := st.GetUplink()
			if uplink == "" {
				uplink = "(none)"
			}
			fmt.Fprintf(a.stdout, "device: uplink %s, links from %s, nat %t, %s\n", uplink, st.GetLinkPrefix(), st.GetNat(), mode)
			for _, cn := range rep.GetContainers() {
				fmt.Fprintf(a.stdout, "\n%s (%s)\n  host link:  %s %s\n", cn.GetName(), cn.GetUuid(), cn.GetHostInterface(), cn.GetHostAddress())
				if d := cn.GetDnsServer(); d != "" {
					fmt.Fprintf(a.stdout, "  dns:        %s\n", d)
				}
				for _, i := range cn.GetInterfaces() {
					state := "down"
					if i.GetUp() {
						state = "up"
					}
					extra := ""
					if i.GetAssigned() {
						extra = " (assigned host interface)"
					}
					fmt.Fprintf(a.stdout, "  interface:  %s %s %s %s%s\n", i.GetName(), state, i.GetMac(), strings.Join(i.GetAddresses(), " "), extra)
				}
				for _, r := range cn.GetRoutes() {
					via := ""
					if r.GetGateway() != "" {
						via = " via " + r.GetGateway()
					}
					fmt.Fprintf(a.stdout, "  route:      %s%s dev %s\n", r.GetDestination(), via, r.GetInterface())
				}
				fmt.Fprintf(a.stdout, "  allowed:    %d packets, %d bytes\n  dropped:    %d packets, %d bytes\n", cn.GetAllowedPackets(), cn.GetAllowedBytes(), cn.GetDroppedPackets(), cn.GetDroppedBytes())
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "  DIRECTION\tPEER\tPROTOCOL\tPORTS\tONE-WAY\tPACKETS")
				for _, f := range cn.GetFlows() {
					ports := strings.Join(f.GetPorts(), ",")
					if ports == "" {
						ports = "all"
					}
					fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%t\t%d\n", strings.ToLower(f.GetDirection().String()), f.GetPeer(), strings.ToLower(f.GetProtocol().String()), ports, f.GetOneWay(), f.GetPackets())
				}
				tw.Flush()
			}
			return nil
		},
	}
}
