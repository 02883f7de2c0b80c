package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/cmlproject/cml/internal/errdefs"
)

// TestGyroidOSNetworkFieldsLoad: GyroidOS's network fields keep their
// numbers and meaning (a GyroidOS config loads unchanged).
func TestGyroidOSNetworkFieldsLoad(t *testing.T) {
	text := `name: "c1"
guest_os: "g"
dns_server: "192.0.2.53"
netns: true
net_ifaces { netif: "eth1" }
net_ifaces { netif: "00:11:22:33:44:55" }
vnet_configs { if_name: "eth0" configure: true if_mac: "02:00:00:00:00:01" }
`
	c, err := ParseContainer("c1.conf", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.GetNetIfaces()[1].GetNetif() != "00:11:22:33:44:55" || !c.GetVnetConfigs()[0].GetConfigure() || c.GetDnsServer() != "192.0.2.53" {
		t.Errorf("parsed %v", c)
	}
}

func TestNetworkFlowsValidate(t *testing.T) {
	base := "name: \"x\"\nguest_os: \"g\"\n"
	ok := base + `network_flows { direction: EGRESS peer_cidr: "192.0.2.0/24" protocol: TCP ports: "80" ports: "8000-8080" }
network_flows { direction: INGRESS peer_container: "y" protocol: UDP one_way: true }
network_flows { direction: EGRESS peer_uplink: true protocol: ICMP }
`
	if _, err := ParseContainer("c.conf", []byte(ok)); err != nil {
		t.Fatalf("valid flows refused: %v", err)
	}
	cases := []struct{ body, want string }{
		{`network_flows { peer_uplink: true protocol: TCP }`, "direction is required"},
		{`network_flows { direction: EGRESS protocol: TCP }`, "exactly one peer"},
		{`network_flows { direction: EGRESS peer_uplink: true peer_container: "y" protocol: TCP }`, "exactly one peer"},
		{`network_flows { direction: EGRESS peer_uplink: true }`, "protocol is required"},
		{`network_flows { direction: EGRESS peer_cidr: "192.0.2.0/33" protocol: TCP }`, "not an IPv4 network"},
		{`network_flows { direction: EGRESS peer_cidr: "2001:db8::/32" protocol: TCP }`, "only IPv4"},
		{`network_flows { direction: EGRESS peer_cidr: "192.0.2.1/24" protocol: TCP }`, "host bits set (did you mean 192.0.2.0/24?)"},
		{`network_flows { direction: EGRESS peer_uplink: true protocol: TCP ports: "0" }`, "port 0"},
		{`network_flows { direction: EGRESS peer_uplink: true protocol: TCP ports: "65536" }`, "not a port"},
		{`network_flows { direction: EGRESS peer_uplink: true protocol: TCP ports: "9-1" }`, "reversed"},
		{`network_flows { direction: EGRESS peer_uplink: true protocol: ICMP ports: "1" }`, "icmp has no ports"},
		{`network_flows { direction: EGRESS peer_container: "x" protocol: TCP }`, "names the container itself"},
		{`network_flows { direction: EGRESS peer_container: "../y" protocol: TCP }`, "not a container name"},
		{"vnet_configs { if_name: \"a\" }\nvnet_configs { if_name: \"b\" }", "at most one"},
		{`vnet_configs { if_name: "this-name-is-too-long" }`, "not an interface name"},
		{`vnet_configs { if_name: "eth0" if_mac: "01:00:00:00:00:01" }`, "multicast"},
		{"net_ifaces { netif: \"eth1\" }\nnet_ifaces { netif: \"eth1\" }", "assigned twice"},
		{`net_ifaces { netif: "eth1" mac_filter: "00:11:22:33:44:55" }`, "mac_filter"},
		{`net_ifaces { netif: "a/b" }`, "neither an interface name nor a MAC"},
		{`dns_server: "2001:db8::53"`, "not an IPv4 address"},
		{"netns: false\ndns_server: \"192.0.2.53\"", "netns"},
	}
	for _, c := range cases {
		_, err := ParseContainer("c.conf", []byte(base+c.body+"\n"))
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: %v (want one line with %q)", c.body, err, c.want)
		}
	}
}

func TestNetworkSettingsValidate(t *testing.T) {
	d, err := ParseDevice("device.conf", []byte("network { uplink: \"eth0\" island: true }\n"))
	if err != nil || d.GetNetwork().GetLinkPrefix() != "10.231.0.0/16" || !d.GetNetwork().GetNat() || d.GetNetwork().GetNftTable() != "cml" {
		t.Fatalf("%v %v", d, err)
	}
	for bad, want := range map[string]string{
		`network { uplink: "a b" }`:                                                     "network.uplink",
		`network { link_prefix: "10.0.0.0/31" }`:                                        "too small",
		`network { link_prefix: "10.0.0.1/16" }`:                                        "host bits",
		`network { uplink_only_via { address: "x" port: 1 } }`:                          "not an IPv4 address",
		`network { uplink_only_via { address: "192.0.2.1" } }`:                          "port 0",
		`network { uplink_only_via { address: "192.0.2.1" port: 443 protocol: ICMP } }`: "TCP or UDP",
		`network { island: true uplink_only_via { address: "192.0.2.1" port: 443 } }`:   "exclude each other",
		`network { uplink_only_via { address: "10.231.0.9" port: 443 } }`:               "inside link_prefix",
		`network { nflog_group: 70000 }`:                                                "nflog_group",
		`network { denied_events_per_second: 0 }`:                                       "denied_events_per_second",
		`network { nft_table: "a;b" }`:                                                  "nft_table",
	} {
		_, err := ParseDevice("device.conf", []byte(bad+"\n"))
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v (want %q)", bad, err, want)
		}
	}
}
