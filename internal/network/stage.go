// Package network separates container networks (TSF-ISO, CR 5.1): each
// container with a network gets its own network namespace, owned by cmld's
// user namespace, and one routed point-to-point link to the host; a
// deny-by-default nftables policy in the host's namespace lets through
// exactly the flows the signed configs allow, and every denied packet is
// counted and audited. It is the "network" stage of the start pipeline.
package network

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/oci"
)

// Peer is what the stage needs to know of another container.
type Peer struct {
	ID     string
	Name   string
	Slot   uint32
	Config *cmlv1.ContainerConfig
}

// Stage is the network stage.
type Stage struct {
	settings Settings
	fw       *firewall
	raw      *cmlv1.NetworkSettings
	// Peers resolves a container name (peer_container) to the container.
	Peers func(name string) (Peer, error)
	Audit audit.Recorder
	Log   *slog.Logger

	host *os.File // cmld's own network namespace

	mu      sync.Mutex
	ready   error             // why the table could not be built
	running map[string]*run   // by container id
	ifaces  map[string]string // assigned host interface name -> container id
	byIndex map[int]string    // host link ifindex -> container id
	denied  *audit.Limiter    // rate limiting of denied-flow audit records
}

// run is one container's network while it runs.
type run struct {
	ns    *os.File // holds the namespace (and assigned interfaces) until release
	rec   record
	index int
}

// record is the stage's part of a run record.
type record struct {
	Name     string            `json:"name"`
	Policy   Policy            `json:"policy"`
	Inside   string            `json:"inside"`
	DNS      string            `json:"dns,omitempty"`
	Assigned []assignedIface   `json:"assigned,omitempty"`
	Peers    map[string]string `json:"peers,omitempty"` // peer link -> container name
}

// New returns the network stage for the device's settings.
func New(n *cmlv1.NetworkSettings, log *slog.Logger) (*Stage, error) {
	if n == nil {
		n = &cmlv1.NetworkSettings{}
	}
	s, err := settingsFrom(n)
	if err != nil {
		return nil, err
	}
	host, err := os.Open("/proc/self/ns/net")
	if err != nil {
		return nil, err
	}
	return &Stage{settings: s, fw: newFirewall(s), raw: n, Log: log, host: host, running: map[string]*run{}, ifaces: map[string]string{}, byIndex: map[int]string{}, denied: &audit.Limiter{PerSecond: int(n.GetDeniedEventsPerSecond())}}, nil
}

func settingsFrom(n *cmlv1.NetworkSettings) (Settings, error) {
	if err := config.ValidateNetworkSettings("device.conf", n); err != nil {
		return Settings{}, err
	}
	p, _ := config.ParseCIDR(n.GetLinkPrefix())
	s := Settings{Table: n.GetNftTable(), Uplink: n.GetUplink(), Prefix: p, NAT: n.GetNat(), Island: n.GetIsland(), NflogGroup: uint16(n.GetNflogGroup())}
	if v := n.GetUplinkOnlyVia(); v != nil {
		a, _ := netip.ParseAddr(v.GetAddress())
		s.Via = &Endpoint{Addr: a, Protocol: v.GetProtocol(), Port: uint16(v.GetPort())}
	}
	return s, nil
}

// Settings returns the device's network settings in force.
func (st *Stage) Settings() *cmlv1.NetworkSettings { return st.raw }

// Name implements container.Stage.
func (st *Stage) Name() string { return "network" }

// wants reports whether a config needs a prepared network: a link, flows,
// DNS or assigned interfaces. A container with its own namespace and none
// of these has only loopback, in a namespace the runtime makes.
func wants(cfg *cmlv1.ContainerConfig) bool {
	return cfg.GetNetns() && (len(cfg.GetVnetConfigs()) > 0 || len(cfg.GetNetworkFlows()) > 0 || cfg.GetDnsServer() != "" || len(cfg.GetNetIfaces()) > 0)
}

// Check validates a config against the device's network settings; the
// manager calls it at create and update-config.
func (st *Stage) Check(source string, cfg *cmlv1.ContainerConfig) error {
	fail := func(field, format string, args ...any) error {
		return &config.FieldError{Source: source, Field: field, Msg: fmt.Sprintf(format, args...)}
	}
	if d := cfg.GetDnsServer(); d != "" {
		if a, err := netip.ParseAddr(d); err == nil && st.settings.Prefix.Contains(a) {
			return fail("dns_server", "%s is inside the device's container link prefix %s", a, st.settings.Prefix)
		}
	}
	for i, f := range cfg.GetNetworkFlows() {
		if f.GetPeerUplink() && st.settings.Uplink == "" {
			return fail("network_flows", "flow %d: peer_uplink needs the device setting network.uplink, which is not set", i+1)
		}
		if f.PeerCidr != nil {
			p, err := config.ParseCIDR(f.GetPeerCidr())
			if err == nil && p.Overlaps(st.settings.Prefix) {
				return fail("network_flows", "flow %d: peer_cidr %s overlaps the container link prefix %s; name the container with peer_container", i+1, p, st.settings.Prefix)
			}
		}
	}
	for _, p := range cfg.GetNetIfaces() {
		if st.settings.Uplink != "" && p.GetNetif() == st.settings.Uplink {
			return fail("net_ifaces", "netif %s is the device's uplink and cannot be assigned to a container", p.GetNetif())
		}
	}
	return nil
}

// policy resolves a config's flows into kernel rules.
func (st *Stage) policy(id string, cfg *cmlv1.ContainerConfig, link string, host, addr netip.Addr) (Policy, map[string]string, error) {
	p := Policy{ID: id, Link: link, Addr: addr.String(), HostAddr: host.String()}
	peers := map[string]string{}
	for i, f := range cfg.GetNetworkFlows() {
		r := Rule{Direction: f.GetDirection(), Protocol: f.GetProtocol(), OneWay: f.GetOneWay()}
		switch {
		case f.GetPeerUplink():
			if st.settings.Uplink == "" {
				return p, nil, errdefs.InvalidArgument("network_flows: flow %d: peer_uplink needs the device setting network.uplink", i+1)
			}
			if _, err := netlink.LinkByName(st.settings.Uplink); err != nil {
				return p, nil, errdefs.FailedPrecondition("network: the device's uplink %s does not exist", st.settings.Uplink)
			}
			r.PeerIf = st.settings.Uplink
		case f.PeerContainer != nil:
			if st.Peers == nil {
				return p, nil, errdefs.InvalidArgument("network_flows: flow %d: peer container %q does not exist", i+1, f.GetPeerContainer())
			}
			peer, err := st.Peers(f.GetPeerContainer())
			if err != nil {
				return p, nil, errdefs.InvalidArgument("network_flows: flow %d: peer container %q does not exist", i+1, f.GetPeerContainer())
			}
			r.PeerIf = hostLinkName(peer.ID, peer.Config)
			peers[r.PeerIf] = peer.Name
		default:
			pfx, err := config.ParseCIDR(f.GetPeerCidr())
			if err != nil {
				return p, nil, errdefs.InvalidArgument("network_flows: flow %d: %v", i+1, err)
			}
			if pfx.Overlaps(st.settings.Prefix) {
				return p, nil, errdefs.InvalidArgument("network_flows: flow %d: peer_cidr %s overlaps the container link prefix %s", i+1, pfx, st.settings.Prefix)
			}
			r.PeerCIDR = pfx.String()
		}
		for _, s := range f.GetPorts() {
			pr, err := config.ParsePorts(s)
			if err != nil {
				return p, nil, errdefs.InvalidArgument("network_flows: flow %d: ports %v", i+1, err)
			}
			r.Ports = append(r.Ports, pr)
		}
		p.Rules = append(p.Rules, r)
	}
	if d := cfg.GetDnsServer(); d != "" {
		for _, proto := range []cmlv1.NetworkFlow_Protocol{cmlv1.NetworkFlow_UDP, cmlv1.NetworkFlow_TCP} {
			p.Rules = append(p.Rules, Rule{Direction: cmlv1.NetworkFlow_EGRESS, PeerCIDR: d + "/32", Protocol: proto, Ports: []config.PortRange{{From: 53, To: 53}}})
		}
	}
	return p, peers, nil
}

// hostLinkName is the host side of a container's link.
func hostLinkName(id string, cfg *cmlv1.ContainerConfig) string {
	if v := cfg.GetVnetConfigs(); len(v) > 0 && v[0].GetIfRootnsName() != "" {
		return v[0].GetIfRootnsName()
	}
	return linkName(id)
}

// Prepare implements container.Stage: it makes the namespace, the link
// and the container's rules, in that order, and undoes all of it on error.
func (st *Stage) Prepare(ctx context.Context, s *container.Start) (any, error) {
	cfg := s.Config
	if !wants(cfg) {
		return nil, nil
	}
	st.mu.Lock()
	ready := st.ready
	st.mu.Unlock()
	if ready != nil {
		return nil, fmt.Errorf("network: %w", ready)
	}
	hostAddr, addr, err := linkAddrs(st.settings.Prefix, s.Slot)
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	link := hostLinkName(s.ID, cfg)
	pol, peers, err := st.policy(s.ID, cfg, link, hostAddr, addr)
	if err != nil {
		return nil, err
	}
	inside, configure := "eth0", true
	var mac = randomMAC()
	if v := cfg.GetVnetConfigs(); len(v) > 0 {
		inside, configure = v[0].GetIfName(), v[0].GetConfigure()
		if m := v[0].GetIfMac(); m != "" {
			mac, _ = parseMAC(m)
		}
	}
	rec := record{Name: s.Name, Policy: pol, Inside: inside, DNS: cfg.GetDnsServer(), Peers: peers}

	// Exclusive interfaces: find them (netlink, without the lock), then
	// reserve them all or refuse the start.
	var moving []assignedIface
	var hostIfs []netlink.Link
	for _, p := range cfg.GetNetIfaces() {
		l, err := findHostIface(p.GetNetif())
		if err != nil {
			st.mu.Lock()
			holder, held := st.ifaces[p.GetNetif()]
			who := st.nameLocked(holder)
			st.mu.Unlock()
			if held {
				return nil, errdefs.FailedPrecondition("net_ifaces: interface %s is assigned to running container %s", p.GetNetif(), who)
			}
			return nil, errdefs.InvalidArgument("net_ifaces: %v", err)
		}
		if l.Attrs().Name == st.settings.Uplink {
			return nil, errdefs.InvalidArgument("net_ifaces: interface %s is the device's uplink", l.Attrs().Name)
		}
		moving = append(moving, assignedIface{Netif: p.GetNetif(), Name: l.Attrs().Name, MAC: l.Attrs().HardwareAddr.String()})
		hostIfs = append(hostIfs, l)
	}
	st.mu.Lock()
	for _, a := range moving {
		if holder, ok := st.ifaces[a.Name]; ok {
			who := st.nameLocked(holder)
			st.mu.Unlock()
			return nil, errdefs.FailedPrecondition("net_ifaces: interface %s is assigned to running container %s", a.Name, who)
		}
	}
	for _, a := range moving {
		st.ifaces[a.Name] = s.ID
	}
	st.mu.Unlock()
	rec.Assigned = moving

	ns, err := newNetNS()
	if err != nil {
		st.mu.Lock()
		st.unreserveLocked(moving)
		st.mu.Unlock()
		return nil, fmt.Errorf("network: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			st.undo(s.ID, ns, rec)
		}
	}()
	index, err := makeLink(ns, linkSpec{Alias: st.fw.alias(s.ID), Host: link, Inside: inside, MAC: mac, HostAddr: hostAddr, Addr: addr, Configure: configure})
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	for i, l := range hostIfs {
		if err := moveIn(ns, l); err != nil {
			rec.Assigned = moving[:i]
			return nil, fmt.Errorf("network: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("network: nftables: %w", err)
	}
	if err := st.fw.add(c, pol); err != nil {
		return nil, fmt.Errorf("network: rules: %w", err)
	}
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("network: install the container's firewall rules: %w", st.fw.explain(err))
	}
	if err := st.files(s, rec, addr); err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	s.NetNSPath = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), ns.Fd())
	// The runtime joins the namespace through that path; the descriptor
	// stays open (and the namespace alive) until the stage is released.
	st.mu.Lock()
	st.running[s.ID] = &run{ns: ns, rec: rec, index: index}
	st.byIndex[index] = s.ID
	st.mu.Unlock()
	ok = true
	return rec, nil
}

// files writes the container's resolv.conf and hosts (read-only bind
// mounts: the container cannot change them).
func (st *Stage) files(s *container.Start, rec record, addr netip.Addr) error {
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n%s\t%s\n", addr, s.Name)
	var names []string
	for _, n := range rec.Peers {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if peer, err := st.Peers(n); err == nil {
			if _, a, err := linkAddrs(st.settings.Prefix, peer.Slot); err == nil {
				hosts += fmt.Sprintf("%s\t%s\n", a, n)
			}
		}
	}
	write := func(name, text string) error {
		p := filepath.Join(s.RunDir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			return err
		}
		s.Mounts = append(s.Mounts, oci.Mount{Source: p, Destination: "/etc/" + name, ReadOnly: true})
		return nil
	}
	if err := write("hosts", hosts); err != nil {
		return err
	}
	if rec.DNS != "" {
		return write("resolv.conf", "# written by cmld from the container's signed config (dns_server)\nnameserver "+rec.DNS+"\n")
	}
	return nil
}

func (st *Stage) nameLocked(id string) string {
	if r := st.running[id]; r != nil {
		return r.rec.Name
	}
	return id
}

func (st *Stage) unreserveLocked(as []assignedIface) {
	for _, a := range as {
		delete(st.ifaces, a.Name)
	}
}

// undo removes what a failed Prepare made.
func (st *Stage) undo(id string, ns *os.File, rec record) {
	if err := st.fw.remove(id); err != nil {
		st.Log.Warn("network: remove rules after a failed start", "container", id, "err", err)
	}
	for _, a := range rec.Assigned {
		if err := moveOut(ns, st.host, a); err != nil {
			st.Log.Warn("network: return an assigned interface", "container", id, "err", err)
		}
	}
	if err := deleteLinks(st.fw.alias(id)); err != nil {
		st.Log.Warn("network: delete link after a failed start", "container", id, "err", err)
	}
	ns.Close()
	st.mu.Lock()
	st.unreserveLocked(rec.Assigned)
	st.mu.Unlock()
}

// Release implements container.Stage: the container's rules, link and
// namespace go, and assigned interfaces return to the host. With no
// record (the daemon died before it was written) it sweeps by id.
func (st *Stage) Release(_ context.Context, id string, raw json.RawMessage) error {
	st.mu.Lock()
	r := st.running[id]
	delete(st.running, id)
	if r != nil {
		delete(st.byIndex, r.index)
	}
	st.denied.Forget(id)
	st.mu.Unlock()
	var rec record
	if r != nil {
		rec = r.rec
	} else if raw != nil {
		json.Unmarshal(raw, &rec)
	}
	var errs []error
	if err := st.fw.remove(id); err != nil {
		errs = append(errs, err)
	}
	if r != nil {
		for _, a := range rec.Assigned {
			if err := moveOut(r.ns, st.host, a); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// Without the namespace (the daemon restarted after the container
	// died) the kernel has already returned physical interfaces to the
	// host and destroyed virtual ones.
	if err := deleteLinks(st.fw.alias(id)); err != nil {
		errs = append(errs, err)
	}
	if r != nil {
		r.ns.Close()
	}
	st.mu.Lock()
	for name, holder := range st.ifaces {
		if holder == id {
			delete(st.ifaces, name)
		}
	}
	st.mu.Unlock()
	return errors.Join(errs...)
}

// Adopt implements container.Adopter: a container that survived a daemon
// restart keeps its network; the stage holds its namespace again.
func (st *Stage) Adopt(_ context.Context, id string, pid int, raw json.RawMessage) error {
	if raw == nil {
		return nil
	}
	var rec record
	if err := json.Unmarshal(raw, &rec); err != nil {
		return fmt.Errorf("network record: %w", err)
	}
	ns, err := openNetNS(pid)
	if err != nil {
		return err
	}
	index := 0
	if l, err := netlink.LinkByName(rec.Policy.Link); err == nil {
		index = l.Attrs().Index
	}
	st.mu.Lock()
	st.running[id] = &run{ns: ns, rec: rec, index: index}
	st.byIndex[index] = id
	for _, a := range rec.Assigned {
		st.ifaces[a.Name] = id
	}
	st.mu.Unlock()
	return nil
}

// Sweep implements container.Sweeper. After the daemon (re)started and
// re-adopted what still runs, it replaces cmld's nftables table in one
// transaction with one built from the device's settings and the adopted
// containers' policies (so the rules in force never lapse), and deletes
// links of containers that are gone.
func (st *Stage) Sweep(_ context.Context, alive map[string]bool) error {
	st.mu.Lock()
	var runs []*run
	keep := map[string]bool{}
	for id, r := range st.running {
		runs = append(runs, r)
		keep[id] = true
	}
	st.mu.Unlock()
	// In the order the links were made (interface indexes only grow), so
	// that the rebuilt table lists the rules as the old one did.
	sort.Slice(runs, func(i, j int) bool { return runs[i].index < runs[j].index })
	var pols []Policy
	for _, r := range runs {
		pols = append(pols, r.rec.Policy)
	}
	err := st.rebuild(pols)
	st.mu.Lock()
	st.ready = err
	st.mu.Unlock()
	if err != nil {
		st.Log.Error("network: cannot install the firewall table; containers with a network will not start", "err", err)
	}
	for _, l := range strayLinks(st.fw.s.Table+":", keep) {
		st.Log.Info("network: removing a link of a container that no longer runs", "link", l.Attrs().Name, "alias", l.Attrs().Alias)
		netlink.LinkDel(l)
	}
	if u := st.settings.Uplink; u != "" {
		if err := sysctl("ipv4/conf/"+u+"/forwarding", "1"); err != nil {
			st.Log.Warn("network: uplink: cannot enable forwarding", "uplink", u, "err", err)
		}
	}
	return nil
}

func (st *Stage) rebuild(pols []Policy) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	st.fw.carry = map[string]expr.Counter{}
	if t, _ := c.ListTableOfFamily(st.fw.table.Name, nftables.TableFamilyINet); t != nil {
		st.fw.carry = st.fw.readAll(c)
		c.DelTable(st.fw.table)
	}
	defer func() { st.fw.carry = nil }()
	if err := st.fw.build(c, pols); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: %w", st.fw.explain(err))
	}
	return nil
}

// remove deletes container id's rules, chains and link from cmld's
// table; what is not there is not an error. A netlink dump that a
// concurrent change (another container's start or stop) interrupts can
// come back short without saying so, so the removal checks what is left
// and goes again (it was seen leaving a stopped container's chains when
// six stopped at once).
func (f *firewall) remove(id string) error {
	var err error
	for try := 0; try < 5; try++ {
		if err = f.removeOnce(id); err == nil && !f.leftover(id) {
			return nil
		}
	}
	if err == nil {
		err = fmt.Errorf("nftables: the rules of %s are still there after five removals", id)
	}
	return err
}

// owned lists container id's rules (in the shared chains) and its own
// chains in cmld's table; no table is nothing owned.
func (f *firewall) owned(c *nftables.Conn, id string) ([]*nftables.Rule, []*nftables.Chain, error) {
	if t, _ := c.ListTableOfFamily(f.table.Name, nftables.TableFamilyINet); t == nil {
		return nil, nil, nil
	}
	var rules []*nftables.Rule
	for _, ch := range []string{chClassify, chAllow, chDeny} {
		rs, err := c.GetRules(f.table, f.chain(ch))
		if err != nil {
			return nil, nil, err
		}
		for _, r := range rs {
			if t, ok := commentOf(r.UserData); ok && strings.HasPrefix(t, "cml "+id+" ") {
				rules = append(rules, r)
			}
		}
	}
	all, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, nil, err
	}
	var chains []*nftables.Chain
	for _, ch := range all {
		if ch.Table.Name == f.table.Name && (ch.Name == egressChain(id) || ch.Name == ingressChain(id)) {
			chains = append(chains, ch)
		}
	}
	return rules, chains, nil
}

// leftover reports whether container id still has chains or rules in
// cmld's table (or they cannot be listed).
func (f *firewall) leftover(id string) bool {
	c, err := nftables.New()
	if err != nil {
		return false
	}
	rules, chains, err := f.owned(c, id)
	return err != nil || len(rules) > 0 || len(chains) > 0
}

// removeOnce is one removal transaction.
func (f *firewall) removeOnce(id string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	rules, chains, err := f.owned(c, id)
	if err != nil {
		return err
	}
	var link []byte
	for _, r := range rules {
		if err := c.DelRule(r); err != nil {
			return err
		}
		if link == nil {
			link = linkOf(r)
		}
	}
	for _, ch := range chains {
		c.FlushChain(ch)
		c.DelChain(ch)
	}
	if link != nil {
		c.SetDeleteElements(f.links, []nftables.SetElement{{Key: link}})
	}
	return c.Flush()
}

// Describe renders network settings on one line, with every default
// spelled out (for the audit record of a change).
func Describe(n *cmlv1.NetworkSettings) string {
	via := "none"
	if v := n.GetUplinkOnlyVia(); v != nil {
		via = fmt.Sprintf("%s:%d/%s", v.GetAddress(), v.GetPort(), strings.ToLower(v.GetProtocol().String()))
	}
	return fmt.Sprintf("uplink=%q link_prefix=%s nat=%t island=%t uplink_only_via=%s nflog_group=%d denied_events_per_second=%d nft_table=%s",
		n.GetUplink(), n.GetLinkPrefix(), n.GetNat(), n.GetIsland(), via, n.GetNflogGroup(), n.GetDeniedEventsPerSecond(), n.GetNftTable())
}

var (
	_ container.Stage   = (*Stage)(nil)
	_ container.Adopter = (*Stage)(nil)
	_ container.Checker = (*Stage)(nil)
	_ container.Sweeper = (*Stage)(nil)
)
