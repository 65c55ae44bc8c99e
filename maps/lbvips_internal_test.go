package maps

import (
	"net/netip"
	"testing"
)

// TestVIPBitSpread: the prefilter's hash spreads the addresses of one /24 (and of one IPv6
// /120) over the whole array, not over one column: with 65536 bits, 256 addresses collide
// about once on average, in each half of the hash.
func TestVIPBitSpread(t *testing.T) {
	for _, base := range []string{"10.199.0.0", "fd00:199::"} {
		seen := map[uint32]bool{}
		a := netip.MustParseAddr(base)
		for range 256 {
			var w uint32
			if a.Is4() {
				w, _ = v4(a)
			} else {
				v, _ := v6(a)
				w = fold6(v)
			}
			seen[vipHash(w)&0xffff] = true
			seen[vipHash(w)>>16|1<<16] = true
			a = a.Next()
		}
		if len(seen) < 500 {
			t.Errorf("%s/24: 256 addresses' two bits on %d bits of the two halves, want at least 500", base, len(seen))
		}
	}
}
