package main

import (
	"net/netip"
	"testing"

	"github.com/outrigger-mesh/outrigger/agent/bootstrap"
	"github.com/outrigger-mesh/outrigger/agent/config"
	"github.com/outrigger-mesh/outrigger/agent/envoy"
)

// The agent talks to Envoy's admin API (drain, active connections,
// readiness) and to Envoy's Prometheus listener at the loopback address of
// the family it wrote into Envoy's bootstrap. If the two disagree, the drain
// call and readiness fail for the pod's whole life.
func TestAgentReachesEnvoyAdminWhereTheBootstrapPutsIt(t *testing.T) {
	v4 := netip.MustParseAddr("10.1.2.3")
	v6 := netip.MustParseAddr("fd00::3")
	for _, tc := range []struct {
		name      string
		ips       []netip.Addr
		dualStack bool
	}{
		{"v4 only", []netip.Addr{v4}, false},
		{"v6 only", []netip.Addr{v6}, false},
		{"v6 first, dual stack", []netip.Addr{v6, v4}, true},
		{"v6 first, no dual stack flag", []netip.Addr{v6, v4}, false},
		{"v4 first, dual stack", []netip.Addr{v4, v6}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc := config.Defaults()
			node := &config.Node{ID: "sidecar~x~p.ns~ns.svc.cluster.local", Type: config.Sidecar, IPs: tc.ips, Metadata: map[string]any{}}
			opts := bootstrap.DefaultOptions()
			opts.DualStack = tc.dualStack
			b, err := bootstrap.Build(bootstrap.Params{Options: opts, Node: node, Proxy: pc})
			if err != nil {
				t.Fatal(err)
			}
			sa := b.GetAdmin().GetAddress().GetSocketAddress()
			want := netip.AddrPortFrom(netip.MustParseAddr(sa.GetAddress()), uint16(sa.GetPortValue()))

			ecfg, err := envoyConfig(pc, node, config.Sidecar, envoy.LogLevels{Level: "warning"}, config.Env{}, agentLoopback(node, opts))
			if err != nil {
				t.Fatal(err)
			}
			if ecfg.Admin != want {
				t.Errorf("supervisor's admin address = %s, bootstrap's = %s", ecfg.Admin, want)
			}
			// newProxyParts gives the status server this address for
			// Envoy's admin and Prometheus listener.
			if got := agentLoopback(node, opts); got != want.Addr() {
				t.Errorf("status server's loopback = %s, bootstrap's admin = %s", got, want.Addr())
			}
		})
	}
}
