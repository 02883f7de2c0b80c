package network

import (
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
)

// userdataComment is a rule comment (what `nft list ruleset` shows); cmld
// tags the rules of each container with its id this way.
func userdataComment(s string) []byte { return userdata.AppendString(nil, userdata.TypeComment, s) }

func commentOf(ud []byte) (string, bool) { return userdata.GetString(ud, userdata.TypeComment) }

// linkOf returns the interface name a per-container rule matches.
func linkOf(r *nftables.Rule) []byte {
	for i, e := range r.Exprs {
		if m, ok := e.(*expr.Meta); ok && (m.Key == expr.MetaKeyIIFNAME || m.Key == expr.MetaKeyOIFNAME) && i+1 < len(r.Exprs) {
			if c, ok := r.Exprs[i+1].(*expr.Cmp); ok {
				return c.Data
			}
		}
	}
	return nil
}
