package config

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// MaxNetworkFlows bounds a container's allowed flows (each is a few
// kernel rules).
const MaxNetworkFlows = 256

// ifnamePattern is what cmld accepts as an interface name: what the
// kernel accepts (at most 15 bytes, no '/', ':' or whitespace), narrowed
// to characters that need no quoting anywhere.
var ifnamePattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

// ValidIfname reports whether s is a usable network interface name.
func ValidIfname(s string) bool { return ifnamePattern.MatchString(s) && s != "." && s != ".." }

// PortRange is an inclusive range of ports.
type PortRange struct{ From, To uint16 }

func (p PortRange) String() string {
	if p.From == p.To {
		return strconv.Itoa(int(p.From))
	}
	return fmt.Sprintf("%d-%d", p.From, p.To)
}

// ParsePorts parses "502" or "8000-8080".
func ParsePorts(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	a, err1 := strconv.ParseUint(lo, 10, 16)
	b, err2 := strconv.ParseUint(hi, 10, 16)
	switch {
	case err1 != nil || err2 != nil:
		return PortRange{}, fmt.Errorf("%q is not a port or range of ports (1-65535, e.g. 502 or 8000-8080)", s)
	case a == 0 || b == 0:
		return PortRange{}, fmt.Errorf("%q: port 0 is not a port (1-65535)", s)
	case a > b:
		return PortRange{}, fmt.Errorf("%q: the range is reversed", s)
	}
	return PortRange{uint16(a), uint16(b)}, nil
}

// ParseCIDR parses an IPv4 network in canonical form ("192.0.2.0/24",
// not "192.0.2.1/24": host bits set are most likely a typo).
func ParseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		if a, aerr := netip.ParseAddr(s); aerr == nil && a.Is4() {
			return netip.PrefixFrom(a, 32), nil
		}
		return netip.Prefix{}, fmt.Errorf("%q is not an IPv4 network (e.g. 192.0.2.0/24)", s)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%q: only IPv4 networks are supported", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set (did you mean %s?)", s, p.Masked())
	}
	return p, nil
}

// validateNetwork checks the network fields of a container config. What
// depends on the device (the uplink, the link prefix) or on other
// containers (peers, interfaces held by running containers) is checked
// when the container starts.
func validateNetwork(v *validator, c *cmlv1.ContainerConfig) {
	netns := c.GetNetns()
	if s := c.GetDnsServer(); s != "" {
		if a, err := netip.ParseAddr(s); err != nil || !a.Is4() {
			v.fail("dns_server", "%q is not an IPv4 address", s)
		}
	}
	if len(c.GetVnetConfigs()) > 1 {
		v.fail("vnet_configs", "%d virtual interfaces: at most one per container is supported (a routed link; see docs/network.md)", len(c.GetVnetConfigs()))
	}
	for _, vn := range c.GetVnetConfigs() {
		switch {
		case !ValidIfname(vn.GetIfName()):
			v.fail("vnet_configs", "if_name %q is not an interface name (1-15 of letters, digits, '_', '.', '-')", vn.GetIfName())
		case vn.GetIfName() == "lo":
			v.fail("vnet_configs", "if_name lo is the loopback interface")
		}
		if n := vn.GetIfRootnsName(); n != "" && !ValidIfname(n) {
			v.fail("vnet_configs", "if_rootns_name %q is not an interface name", n)
		}
		if m := vn.GetIfMac(); m != "" {
			if hw, err := parseMAC(m); err != nil {
				v.fail("vnet_configs", "if_mac %q is not a MAC address", m)
			} else if hw[0]&1 == 1 {
				v.fail("vnet_configs", "if_mac %q is a multicast address", m)
			}
		}
	}
	seen := map[string]bool{}
	for _, p := range c.GetNetIfaces() {
		n := p.GetNetif()
		if _, err := parseMAC(n); err != nil && !ValidIfname(n) {
			v.fail("net_ifaces", "netif %q is neither an interface name nor a MAC address", n)
		}
		if seen[strings.ToLower(n)] {
			v.fail("net_ifaces", "netif %q is assigned twice", n)
		}
		seen[strings.ToLower(n)] = true
		if len(p.GetMacFilter()) > 0 {
			v.fail("net_ifaces", "netif %q: mac_filter (a bridged interface with a MAC allow-list) is not supported yet; assign the interface without it", n)
		}
	}
	if len(c.GetNetworkFlows()) > MaxNetworkFlows {
		v.fail("network_flows", "more than %d flows", MaxNetworkFlows)
	}
	for i, f := range c.GetNetworkFlows() {
		where := fmt.Sprintf("flow %d", i+1)
		if f.Direction == nil {
			v.fail("network_flows", "%s: direction is required (EGRESS or INGRESS)", where)
		}
		peers := 0
		if f.GetPeerUplink() {
			peers++
		}
		if f.PeerContainer != nil {
			peers++
			switch {
			case !ValidName(f.GetPeerContainer()):
				v.fail("network_flows", "%s: peer_container %q is not a container name", where, f.GetPeerContainer())
			case f.GetPeerContainer() == c.GetName():
				v.fail("network_flows", "%s: peer_container names the container itself", where)
			}
		}
		if f.PeerCidr != nil {
			peers++
			if _, err := ParseCIDR(f.GetPeerCidr()); err != nil {
				v.fail("network_flows", "%s: peer_cidr %v", where, err)
			}
		}
		if peers != 1 {
			v.fail("network_flows", "%s: name exactly one peer (peer_uplink, peer_container or peer_cidr), not %d", where, peers)
		}
		if f.Protocol == nil {
			v.fail("network_flows", "%s: protocol is required (TCP, UDP or ICMP)", where)
		}
		if f.GetProtocol() == cmlv1.NetworkFlow_ICMP && len(f.GetPorts()) > 0 {
			v.fail("network_flows", "%s: icmp has no ports", where)
		}
		if len(f.GetPorts()) > 16 {
			v.fail("network_flows", "%s: more than 16 port ranges; use a range", where)
		}
		for _, p := range f.GetPorts() {
			if _, err := ParsePorts(p); err != nil {
				v.fail("network_flows", "%s: ports %v", where, err)
			}
		}
	}
	if !netns && (len(c.GetNetworkFlows()) > 0 || len(c.GetVnetConfigs()) > 0 || len(c.GetNetIfaces()) > 0 || c.GetDnsServer() != "") {
		v.fail("netns", "false shares the host's network: network_flows, vnet_configs, net_ifaces and dns_server need netns: true")
	}
}

func parseMAC(s string) (net.HardwareAddr, error) {
	hw, err := net.ParseMAC(s)
	if err == nil && len(hw) != 6 {
		return nil, fmt.Errorf("not an Ethernet address")
	}
	return hw, err
}

// ValidateNetworkSettings checks device.conf's network section.
func ValidateNetworkSettings(source string, n *cmlv1.NetworkSettings) error {
	fieldErr := func(field, format string, args ...any) error {
		return &FieldError{Source: source, Field: field, Msg: fmt.Sprintf(format, args...)}
	}
	if n == nil {
		return nil
	}
	if u := n.GetUplink(); u != "" && !ValidIfname(u) {
		return fieldErr("network.uplink", "%q is not an interface name", u)
	}
	p, err := ParseCIDR(n.GetLinkPrefix())
	if err != nil {
		return fieldErr("network.link_prefix", "%v", err)
	}
	if p.Bits() > 30 {
		return fieldErr("network.link_prefix", "%s is too small: it must hold at least two /31 links", p)
	}
	if via := n.GetUplinkOnlyVia(); via != nil {
		a, err := netip.ParseAddr(via.GetAddress())
		switch {
		case err != nil || !a.Is4():
			return fieldErr("network.uplink_only_via", "address %q is not an IPv4 address", via.GetAddress())
		case via.GetProtocol() == cmlv1.NetworkFlow_ICMP:
			return fieldErr("network.uplink_only_via", "protocol must be TCP or UDP (a gateway listens on a port)")
		case via.GetPort() == 0 || via.GetPort() > 65535:
			return fieldErr("network.uplink_only_via", "port %d is out of range (1-65535)", via.GetPort())
		case p.Contains(a):
			return fieldErr("network.uplink_only_via", "address %s is inside link_prefix %s", a, p)
		}
		if n.GetIsland() {
			return fieldErr("network.island", "island mode and uplink_only_via exclude each other (island lets nothing leave)")
		}
	}
	if t := n.GetNftTable(); !ValidName(t) || len(t) > 32 {
		return fieldErr("network.nft_table", "%q is not a table name (letters, digits, '_', '.', '-'; at most 32)", t)
	}
	if g := n.GetNflogGroup(); g > 65535 {
		return fieldErr("network.nflog_group", "%d is out of range (0-65535)", g)
	}
	if r := n.GetDeniedEventsPerSecond(); r == 0 || r > 1000 {
		return fieldErr("network.denied_events_per_second", "%d is out of range (1-1000)", r)
	}
	return nil
}
