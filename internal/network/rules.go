package network

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/config"
)

// The packet mark bits the policy uses while it classifies a packet, and
// the connection mark bit of a connection allowed both ways. Only these
// bits are read or written; the rest of either mark is left alone.
const (
	markEgress  = 0x00100000 // the sender's egress rules allow it
	markIngress = 0x00200000 // the receiver's ingress rules allow it
	markOneWay  = 0x00400000 // the matching rule is a diode
	markMask    = markEgress | markIngress | markOneWay
	ctAllowed   = 0x00100000 // replies may pass
)

// Rule is one allow rule of a container, as installed: from the config,
// with peers resolved to interfaces and the device's settings applied.
type Rule struct {
	Direction cmlv1.NetworkFlow_Direction `json:"direction"`
	// Exactly one of: the peer's interface (a container's host link or
	// the uplink) or an IPv4 network.
	PeerIf   string                     `json:"peer_if,omitempty"`
	PeerCIDR string                     `json:"peer_cidr,omitempty"`
	Protocol cmlv1.NetworkFlow_Protocol `json:"protocol"`
	Ports    []config.PortRange         `json:"ports,omitempty"` // empty: all
	OneWay   bool                       `json:"one_way,omitempty"`
}

// Policy is what the kernel enforces for one container.
type Policy struct {
	ID       string `json:"id"`
	Link     string `json:"link"`      // host side of the container's link
	Addr     string `json:"addr"`      // the container's address
	HostAddr string `json:"host_addr"` // the host side's address
	Rules    []Rule `json:"rules"`
}

// Settings are the device's network settings the table is built from.
type Settings struct {
	Uplink     string
	Prefix     netip.Prefix
	NAT        bool
	Island     bool
	Via        *Endpoint
	NflogGroup uint16
	// Table is the nftables table (inet family) cmld owns.
	Table string
}

// Endpoint is the gateway of "uplink only via".
type Endpoint struct {
	Addr     netip.Addr
	Protocol cmlv1.NetworkFlow_Protocol
	Port     uint16
}

// firewall is cmld's nftables table: shared chains built from the
// device's settings, and two chains per container.
type firewall struct {
	s     Settings
	table *nftables.Table
	links *nftables.Set // the host sides of container links
	// carry holds the counters of the table being replaced (by rule
	// comment, or chain and position), so that a rebuild after a daemon
	// restart keeps them.
	carry map[string]expr.Counter
}

// counter is a counter expression, starting from what the replaced table
// had counted for the same rule.
func (f *firewall) counter(key string) *expr.Counter {
	c := f.carry[key]
	return &expr.Counter{Bytes: c.Bytes, Packets: c.Packets}
}

func newFirewall(s Settings) *firewall {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: s.Table}
	return &firewall{s: s, table: t, links: &nftables.Set{Table: t, Name: setLinks, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian}}
}

func (f *firewall) chain(name string) *nftables.Chain {
	return &nftables.Chain{Table: f.table, Name: name}
}

// Shared chains. The per-container chains are eg-<id> and in-<id>.
const (
	chClassify = "classify"
	chAllow    = "allow"
	chDeny     = "deny"
	chVia      = "via"
	setLinks   = "links"
)

func egressChain(id string) string  { return "eg-" + id }
func ingressChain(id string) string { return "in-" + id }

// ifname is an interface name as the kernel compares it.
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

func tagText(id, what string) string { return "cml " + id + " " + what }

func tag(id, what string) []byte { return userdataComment(tagText(id, what)) }

func protoNum(p cmlv1.NetworkFlow_Protocol) byte {
	switch p {
	case cmlv1.NetworkFlow_TCP:
		return unix.IPPROTO_TCP
	case cmlv1.NetworkFlow_UDP:
		return unix.IPPROTO_UDP
	default:
		return unix.IPPROTO_ICMP
	}
}

func protoOf(n byte) (cmlv1.NetworkFlow_Protocol, bool) {
	switch n {
	case unix.IPPROTO_TCP:
		return cmlv1.NetworkFlow_TCP, true
	case unix.IPPROTO_UDP:
		return cmlv1.NetworkFlow_UDP, true
	case unix.IPPROTO_ICMP:
		return cmlv1.NetworkFlow_ICMP, true
	}
	return 0, false
}

// Expression builders, one per nft idiom.

func metaIs(key expr.MetaKey, op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: data}}
}

func inSet(key expr.MetaKey, set *nftables.Set, invert bool) []expr.Any {
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: invert}}
}

// ipv4Addr matches the source (off 12) or destination (off 16) address
// against a network.
func ipv4Net(off uint32, p netip.Prefix) []expr.Any {
	mask := make([]byte, 4)
	binary.BigEndian.PutUint32(mask, ^uint32(0)<<(32-p.Bits()))
	if p.Bits() == 0 {
		mask = []byte{0, 0, 0, 0}
	}
	a := p.Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a[:]},
	}
}

func ipv4AddrNot(off uint32, a netip.Addr) []expr.Any {
	b := a.As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: b[:]},
	}
}

func dport(p config.PortRange) []expr.Any {
	load := &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}
	from, to := binary.BigEndian.AppendUint16(nil, p.From), binary.BigEndian.AppendUint16(nil, p.To)
	if p.From == p.To {
		return []expr.Any{load, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: from}}
	}
	return []expr.Any{load, &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: from, ToData: to}}
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// markSet ORs bits into the packet mark.
func markSet(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(^bits), Xor: u32(bits)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// markClear clears the policy's bits of the packet mark.
func markClear() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(^uint32(markMask)), Xor: u32(0)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// markHas matches packets whose mark has all of bits.
func markHas(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(bits), Xor: u32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: u32(bits)},
	}
}

func verdict(k expr.VerdictKind, ch string) *expr.Verdict { return &expr.Verdict{Kind: k, Chain: ch} }

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func one(e ...expr.Any) []expr.Any { return e }

func (s Settings) logExpr(prefix string) expr.Any {
	return &expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: s.NflogGroup, Data: []byte(prefix)}
}

// buildTable queues the whole table: shared chains, the device's
// settings, and the given containers' policies. The caller deletes an
// existing table in the same batch, so the replacement is atomic.
func (f *firewall) build(c *nftables.Conn, pols []Policy) error {
	s, table, linksSet, chain := f.s, f.table, f.links, f.chain
	c.AddTable(table)
	if err := c.AddSet(linksSet, nil); err != nil {
		return err
	}
	for _, n := range []string{chClassify, chAllow, chDeny, chVia, "police-fwd", "police-in", "police-out"} {
		c.AddChain(chain(n))
	}
	accept := nftables.ChainPolicyAccept
	base := func(name string, hook *nftables.ChainHook) *nftables.Chain {
		return c.AddChain(&nftables.Chain{Table: table, Name: name, Type: nftables.ChainTypeFilter, Hooknum: hook, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	}
	fwd, in, out := base("forward", nftables.ChainHookForward), base("input", nftables.ChainHookInput), base("output", nftables.ChainHookOutput)
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: e}) }

	add(fwd, cat(inSet(expr.MetaKeyIIFNAME, linksSet, false), one(verdict(expr.VerdictJump, "police-fwd"))))
	add(fwd, cat(inSet(expr.MetaKeyOIFNAME, linksSet, false), one(verdict(expr.VerdictJump, "police-fwd"))))
	add(in, cat(inSet(expr.MetaKeyIIFNAME, linksSet, false), one(verdict(expr.VerdictJump, "police-in"))))
	add(out, cat(inSet(expr.MetaKeyOIFNAME, linksSet, false), one(verdict(expr.VerdictJump, "police-out"))))

	// Each police chain: replies and continuations of connections allowed
	// both ways pass; everything else is classified afresh by the
	// sender's egress and the receiver's ingress rules.
	established := []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: u32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: u32(0)},
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(ctAllowed), Xor: u32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: u32(ctAllowed)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
	for _, n := range []string{"police-fwd", "police-in", "police-out"} {
		ch := chain(n)
		add(ch, established)
		add(ch, markClear())
		add(ch, one(verdict(expr.VerdictJump, chClassify)))
	}
	fromLink, toLink := inSet(expr.MetaKeyIIFNAME, linksSet, false), inSet(expr.MetaKeyOIFNAME, linksSet, false)
	notFromLink, notToLink := inSet(expr.MetaKeyIIFNAME, linksSet, true), inSet(expr.MetaKeyOIFNAME, linksSet, true)
	pf := chain("police-fwd")
	if s.Island {
		add(pf, cat(fromLink, notToLink, one(s.logExpr("cml island"), &expr.Counter{}, verdict(expr.VerdictGoto, chDeny))))
	}
	if s.Via != nil {
		add(pf, cat(fromLink, notToLink, one(verdict(expr.VerdictJump, chVia))))
		a := s.Via.Addr.As4()
		add(chain(chVia), cat(
			metaIs(expr.MetaKeyNFPROTO, expr.CmpOpEq, []byte{unix.NFPROTO_IPV4}),
			one(&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a[:]}),
			metaIs(expr.MetaKeyL4PROTO, expr.CmpOpEq, []byte{protoNum(s.Via.Protocol)}),
			dport(config.PortRange{From: s.Via.Port, To: s.Via.Port}),
			one(verdict(expr.VerdictReturn, ""))))
		add(chain(chVia), one(verdict(expr.VerdictGoto, chDeny)))
	}
	add(pf, cat(fromLink, toLink, markHas(markEgress|markIngress), one(verdict(expr.VerdictGoto, chAllow))))
	add(pf, cat(fromLink, notToLink, markHas(markEgress), one(verdict(expr.VerdictGoto, chAllow))))
	add(pf, cat(notFromLink, toLink, markHas(markIngress), one(verdict(expr.VerdictGoto, chAllow))))
	add(pf, one(verdict(expr.VerdictGoto, chDeny)))
	add(chain("police-in"), cat(markHas(markEgress), one(verdict(expr.VerdictGoto, chAllow))))
	add(chain("police-in"), one(verdict(expr.VerdictGoto, chDeny)))
	add(chain("police-out"), cat(markHas(markIngress), one(verdict(expr.VerdictGoto, chAllow))))
	add(chain("police-out"), one(verdict(expr.VerdictGoto, chDeny)))

	// allow: per-container counters come first (added per container),
	// then diodes pass without marking the connection, everything else
	// marks it so that its replies pass.
	add(chain(chAllow), cat(markHas(markOneWay), one(&expr.Verdict{Kind: expr.VerdictAccept})))
	add(chain(chAllow), []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(^uint32(ctAllowed)), Xor: u32(ctAllowed)},
		&expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1},
		&expr.Verdict{Kind: expr.VerdictAccept},
	})
	// deny: per-container counted, logged drops come first; this one
	// catches what names no known link.
	c.AddRule(&nftables.Rule{Table: table, Chain: chain(chDeny), Exprs: one(s.logExpr("cml deny"), f.counter("cml deny rest"), &expr.Verdict{Kind: expr.VerdictDrop}), UserData: userdataComment("cml deny rest")})

	if s.NAT && s.Uplink != "" {
		nat := c.AddChain(&nftables.Chain{Table: table, Name: "postrouting", Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
		add(nat, cat(
			metaIs(expr.MetaKeyOIFNAME, expr.CmpOpEq, ifname(s.Uplink)),
			metaIs(expr.MetaKeyNFPROTO, expr.CmpOpEq, []byte{unix.NFPROTO_IPV4}),
			ipv4Net(12, s.Prefix),
			one(&expr.Masq{})))
	}
	for _, p := range pols {
		if err := f.add(c, p); err != nil {
			return err
		}
	}
	return nil
}

// addPolicy queues one container's chains and rules. Within one batch
// they appear together or not at all.
func (f *firewall) add(c *nftables.Conn, p Policy) error {
	s, table, linksSet, chain := f.s, f.table, f.links, f.chain
	addr, err := netip.ParseAddr(p.Addr)
	if err != nil {
		return fmt.Errorf("address %q: %w", p.Addr, err)
	}
	eg, in := c.AddChain(chain(egressChain(p.ID))), c.AddChain(chain(ingressChain(p.ID)))
	notV4 := cat(metaIs(expr.MetaKeyNFPROTO, expr.CmpOpNeq, []byte{unix.NFPROTO_IPV4}), one(verdict(expr.VerdictReturn, "")))
	c.AddRule(&nftables.Rule{Table: table, Chain: eg, Exprs: notV4})
	c.AddRule(&nftables.Rule{Table: table, Chain: in, Exprs: notV4})
	// A container speaks only from its own address, and only packets to
	// its own address are delivered to it.
	c.AddRule(&nftables.Rule{Table: table, Chain: eg, Exprs: cat(ipv4AddrNot(12, addr), one(verdict(expr.VerdictReturn, "")))})
	c.AddRule(&nftables.Rule{Table: table, Chain: in, Exprs: cat(ipv4AddrNot(16, addr), one(verdict(expr.VerdictReturn, "")))})
	// Two-way rules first: when a packet matches both, its replies pass.
	rules := append([]Rule(nil), p.Rules...)
	sort.SliceStable(rules, func(i, j int) bool { return !rules[i].OneWay && rules[j].OneWay })
	pos := map[*nftables.Chain]int{eg: 2, in: 2} // after the two fixed rules
	for _, r := range rules {
		ch, bit := eg, uint32(markEgress)
		if r.Direction == cmlv1.NetworkFlow_INGRESS {
			ch, bit = in, markIngress
		}
		if r.OneWay {
			bit |= markOneWay
		}
		var peer []expr.Any
		switch {
		case r.PeerIf != "" && r.Direction == cmlv1.NetworkFlow_EGRESS:
			peer = metaIs(expr.MetaKeyOIFNAME, expr.CmpOpEq, ifname(r.PeerIf))
		case r.PeerIf != "":
			peer = metaIs(expr.MetaKeyIIFNAME, expr.CmpOpEq, ifname(r.PeerIf))
		default:
			pfx, err := netip.ParsePrefix(r.PeerCIDR)
			if err != nil {
				return fmt.Errorf("peer %q: %w", r.PeerCIDR, err)
			}
			off := uint32(16)
			if r.Direction == cmlv1.NetworkFlow_INGRESS {
				off = 12
			}
			peer = ipv4Net(off, pfx)
		}
		proto := metaIs(expr.MetaKeyL4PROTO, expr.CmpOpEq, []byte{protoNum(r.Protocol)})
		ports := r.Ports
		if len(ports) == 0 {
			ports = []config.PortRange{{}}
		}
		for _, pr := range ports {
			var pm []expr.Any
			if pr.From != 0 {
				pm = dport(pr)
			}
			key := fmt.Sprintf("%s#%d", ch.Name, pos[ch])
			pos[ch]++
			c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: cat(peer, proto, pm, markSet(bit), one(f.counter(key), verdict(expr.VerdictReturn, "")))})
		}
	}
	link := ifname(p.Link)
	tagged := func(ch, what string, e []expr.Any) {
		c.AddRule(&nftables.Rule{Table: table, Chain: chain(ch), Exprs: e, UserData: tag(p.ID, what)})
	}
	tagged(chClassify, "egress", cat(metaIs(expr.MetaKeyIIFNAME, expr.CmpOpEq, link), one(verdict(expr.VerdictJump, egressChain(p.ID)))))
	tagged(chClassify, "ingress", cat(metaIs(expr.MetaKeyOIFNAME, expr.CmpOpEq, link), one(verdict(expr.VerdictJump, ingressChain(p.ID)))))
	// Counters of what the policy let through, by container; the allow
	// chain's verdicts follow them.
	c.InsertRule(&nftables.Rule{Table: table, Chain: chain(chAllow), Exprs: cat(metaIs(expr.MetaKeyIIFNAME, expr.CmpOpEq, link), one(f.counter(tagText(p.ID, "allowed-out")))), UserData: tag(p.ID, "allowed-out")})
	c.InsertRule(&nftables.Rule{Table: table, Chain: chain(chAllow), Exprs: cat(metaIs(expr.MetaKeyOIFNAME, expr.CmpOpEq, link), one(f.counter(tagText(p.ID, "allowed-in")))), UserData: tag(p.ID, "allowed-in")})
	// Denied packets are counted per container, logged to NFLOG for the
	// audit trail, and dropped.
	c.InsertRule(&nftables.Rule{Table: table, Chain: chain(chDeny), Exprs: cat(metaIs(expr.MetaKeyIIFNAME, expr.CmpOpEq, link), one(s.logExpr("cml deny"), f.counter(tagText(p.ID, "denied-out")), &expr.Verdict{Kind: expr.VerdictDrop})), UserData: tag(p.ID, "denied-out")})
	c.InsertRule(&nftables.Rule{Table: table, Chain: chain(chDeny), Exprs: cat(metaIs(expr.MetaKeyOIFNAME, expr.CmpOpEq, link), one(s.logExpr("cml deny"), f.counter(tagText(p.ID, "denied-in")), &expr.Verdict{Kind: expr.VerdictDrop})), UserData: tag(p.ID, "denied-in")})
	return c.SetAddElements(linksSet, []nftables.SetElement{{Key: link}})
}

// explain turns an nftables error (the library repeats the kernel's answer
// once per message of the batch, one per line) into one line.
func (f *firewall) explain(err error) error {
	switch {
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("cmld's nftables table %q or a chain of it is missing (removed by hand?); restart cmld to rebuild it", f.table.Name)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("not permitted to change nftables (cmld needs CAP_NET_ADMIN)")
	}
	msg, _, _ := strings.Cut(err.Error(), "\n")
	return errors.New(strings.TrimPrefix(msg, "conn.Receive: "))
}
