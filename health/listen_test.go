package health

import (
	"net/netip"
	"testing"
)

// The default bind address must not force an IPv6 socket: on a node booted
// with ipv6.disable=1 an AF_INET6 socket cannot exist, and "[::]:15020"
// would fail where Istio's ":15020" falls back to IPv4. An empty host lets
// Go pick a dual-stack socket when IPv6 exists and IPv4 otherwise.
func TestListenAddr(t *testing.T) {
	for _, tc := range []struct {
		addr netip.Addr
		port uint16
		want string
	}{
		{netip.IPv6Unspecified(), 15020, ":15020"},
		{DefaultConfig().BindAddr, 15021, ":15021"},
		{netip.MustParseAddr("127.0.0.1"), 0, "127.0.0.1:0"},
		{netip.MustParseAddr("0.0.0.0"), 15020, "0.0.0.0:15020"},
		{netip.IPv6Loopback(), 15020, "[::1]:15020"},
	} {
		if got := listenAddr(tc.addr, tc.port); got != tc.want {
			t.Errorf("listenAddr(%s, %d) = %q, want %q", tc.addr, tc.port, got, tc.want)
		}
	}
}

// The default still serves both families where IPv6 exists.
func TestListenDefaultServesIPv4(t *testing.T) {
	ln, err := listen(DefaultConfig().BindAddr, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ap := netip.MustParseAddrPort(ln.Addr().String())
	if !ap.Addr().IsUnspecified() {
		t.Errorf("bound %s, want the unspecified address", ap)
	}
}
