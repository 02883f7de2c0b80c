package network

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
)

func parseMAC(s string) (net.HardwareAddr, error) { return net.ParseMAC(s) }

type counters struct {
	allowedPackets, allowedBytes, droppedPackets, droppedBytes uint64
}

// readCounters reads container id's allowed and dropped counters from the
// kernel.
func (f *firewall) counters(id string) (counters, error) {
	table, chain := f.table, f.chain
	var out counters
	c, err := nftables.New()
	if err != nil {
		return out, err
	}
	for _, ch := range []string{chAllow, chDeny} {
		rules, err := c.GetRules(table, chain(ch))
		if err != nil {
			return out, err
		}
		for _, r := range rules {
			t, _ := commentOf(r.UserData)
			if !strings.HasPrefix(t, "cml "+id+" ") {
				continue
			}
			for _, e := range r.Exprs {
				if n, ok := e.(*expr.Counter); ok {
					if ch == chAllow {
						out.allowedPackets += n.Packets
						out.allowedBytes += n.Bytes
					} else {
						out.droppedPackets += n.Packets
						out.droppedBytes += n.Bytes
					}
				}
			}
		}
	}
	return out, nil
}

// decodeRule reads an allow rule back from its kernel expressions (the
// forms addPolicy writes); ok is false for the chain's fixed rules.
func decodeRule(r *nftables.Rule, dir cmlv1.NetworkFlow_Direction) (f *cmlv1.EffectiveFlow, peerIf string, ok bool) {
	f = &cmlv1.EffectiveFlow{Direction: dir.Enum()}
	ex := r.Exprs
	haveProto, haveMark := false, false
	for i := 0; i < len(ex); i++ {
		switch e := ex[i].(type) {
		case *expr.Meta:
			if e.SourceRegister || i+1 >= len(ex) {
				continue
			}
			cmp, isCmp := ex[i+1].(*expr.Cmp)
			if !isCmp {
				continue
			}
			switch e.Key {
			case expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME:
				peerIf = strings.TrimRight(string(cmp.Data), "\x00")
			case expr.MetaKeyL4PROTO:
				if p, ok := protoOf(cmp.Data[0]); ok {
					f.Protocol, haveProto = p.Enum(), true
				}
			}
			i++
		case *expr.Payload:
			if e.Base == expr.PayloadBaseNetworkHeader && e.Len == 4 && i+2 < len(ex) {
				bw, ok1 := ex[i+1].(*expr.Bitwise)
				cmp, ok2 := ex[i+2].(*expr.Cmp)
				if ok1 && ok2 {
					ones := 0
					for _, b := range bw.Mask {
						for ; b != 0; b <<= 1 {
							ones++
						}
					}
					f.Peer = proto.String(netip.PrefixFrom(netip.AddrFrom4([4]byte(cmp.Data)), ones).String())
					i += 2
				}
			}
			if e.Base == expr.PayloadBaseTransportHeader && e.Offset == 2 && i+1 < len(ex) {
				switch c := ex[i+1].(type) {
				case *expr.Cmp:
					v := binary.BigEndian.Uint16(c.Data)
					f.Ports = append(f.Ports, config.PortRange{From: v, To: v}.String())
				case *expr.Range:
					f.Ports = append(f.Ports, config.PortRange{From: binary.BigEndian.Uint16(c.FromData), To: binary.BigEndian.Uint16(c.ToData)}.String())
				}
				i++
			}
		case *expr.Bitwise:
			if len(e.Xor) == 4 {
				x := binary.NativeEndian.Uint32(e.Xor)
				if x&(markEgress|markIngress) != 0 {
					haveMark = true
					f.OneWay = proto.Bool(x&markOneWay != 0)
				}
			}
		case *expr.Counter:
			f.Packets = proto.Uint64(e.Packets)
		}
	}
	return f, peerIf, haveProto && haveMark
}

// Report reads one running container's network back from the kernel.
func (st *Stage) Report(id string) (*cmlv1.ContainerNetwork, error) {
	st.mu.Lock()
	r := st.running[id]
	var rec record
	var ns int = -1
	if r != nil {
		rec = r.rec
		ns = int(r.ns.Fd())
	}
	names := map[string]string{}
	for _, o := range st.running {
		names[o.rec.Policy.Link] = o.rec.Name
	}
	// Hold the namespace while reading it, even if the container stops.
	var dup int
	if ns >= 0 {
		var err error
		if dup, err = unix.Dup(ns); err != nil {
			ns = -1
		} else {
			ns = dup
		}
	}
	st.mu.Unlock()
	if ns < 0 {
		return nil, errdefs.NotFound("container %s has no network of its own (not running, netns: false, or no network configured)", id)
	}
	defer unix.Close(ns)
	out := &cmlv1.ContainerNetwork{Uuid: proto.String(id), Name: proto.String(rec.Name), HostInterface: proto.String(rec.Policy.Link)}
	if rec.DNS != "" {
		out.DnsServer = proto.String(rec.DNS)
	}
	if l, err := netlink.LinkByName(rec.Policy.Link); err == nil {
		if as, err := netlink.AddrList(l, netlink.FAMILY_V4); err == nil && len(as) > 0 {
			out.HostAddress = proto.String(as[0].IPNet.String())
		}
	}
	h, err := netlink.NewHandleAt(netns.NsHandle(ns))
	if err != nil {
		return nil, fmt.Errorf("network of %s: %w", rec.Name, err)
	}
	defer h.Close()
	links, err := linkList(h)
	if err != nil {
		return nil, err
	}
	assigned := map[string]bool{}
	for _, a := range rec.Assigned {
		assigned[strings.ToLower(a.MAC)] = true
	}
	byIndex := map[int]string{}
	for _, l := range links {
		a := l.Attrs()
		byIndex[a.Index] = a.Name
		ni := &cmlv1.NetworkInterface{Name: proto.String(a.Name), Up: proto.Bool(a.Flags&net.FlagUp != 0)}
		if len(a.HardwareAddr) > 0 {
			ni.Mac = proto.String(a.HardwareAddr.String())
			ni.Assigned = proto.Bool(assigned[strings.ToLower(a.HardwareAddr.String())])
		}
		if as, err := h.AddrList(l, netlink.FAMILY_V4); err == nil {
			for _, ad := range as {
				ni.Addresses = append(ni.Addresses, ad.IPNet.String())
			}
		}
		out.Interfaces = append(out.Interfaces, ni)
	}
	if rs, err := h.RouteList(nil, netlink.FAMILY_V4); err == nil {
		for _, rt := range rs {
			nr := &cmlv1.NetworkRoute{Destination: proto.String("default"), Interface: proto.String(byIndex[rt.LinkIndex])}
			if rt.Dst != nil {
				nr.Destination = proto.String(rt.Dst.String())
			}
			if rt.Gw != nil {
				nr.Gateway = proto.String(rt.Gw.String())
			}
			out.Routes = append(out.Routes, nr)
		}
	}
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	for _, d := range []struct {
		chain string
		dir   cmlv1.NetworkFlow_Direction
	}{{egressChain(id), cmlv1.NetworkFlow_EGRESS}, {ingressChain(id), cmlv1.NetworkFlow_INGRESS}} {
		rules, err := c.GetRules(st.fw.table, st.fw.chain(d.chain))
		if err != nil {
			return nil, fmt.Errorf("rules of %s: %w", rec.Name, err)
		}
		for _, r := range rules {
			f, peerIf, ok := decodeRule(r, d.dir)
			if !ok {
				continue
			}
			switch {
			case peerIf == "":
			case peerIf == st.settings.Uplink:
				f.Peer = proto.String("uplink " + peerIf)
			case names[peerIf] != "":
				f.Peer = proto.String("container " + names[peerIf])
			case rec.Peers[peerIf] != "":
				f.Peer = proto.String("container " + rec.Peers[peerIf])
			default:
				f.Peer = proto.String("interface " + peerIf)
			}
			out.Flows = append(out.Flows, f)
		}
	}
	cn, err := st.fw.counters(id)
	if err != nil {
		return nil, err
	}
	out.AllowedPackets, out.AllowedBytes = proto.Uint64(cn.allowedPackets), proto.Uint64(cn.allowedBytes)
	out.DroppedPackets, out.DroppedBytes = proto.Uint64(cn.droppedPackets), proto.Uint64(cn.droppedBytes)
	return out, nil
}

// Running lists the ids of containers with a network, sorted by name.
func (st *Stage) Running() []string {
	st.mu.Lock()
	defer st.mu.Unlock()
	var ids []string
	for id := range st.running {
		ids = append(ids, id)
	}
	return ids
}

// readAll reads every counter of the table: of tagged rules by comment,
// of the per-container chains' rules by chain and position.
func (f *firewall) readAll(c *nftables.Conn) map[string]expr.Counter {
	out := map[string]expr.Counter{}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return out
	}
	for _, ch := range chains {
		if ch.Table.Name != f.table.Name {
			continue
		}
		rules, err := c.GetRules(f.table, ch)
		if err != nil {
			continue
		}
		for i, r := range rules {
			key := fmt.Sprintf("%s#%d", ch.Name, i)
			if t, ok := commentOf(r.UserData); ok {
				key = t
			}
			for _, e := range r.Exprs {
				if n, ok := e.(*expr.Counter); ok {
					out[key] = *n
				}
			}
		}
	}
	return out
}
