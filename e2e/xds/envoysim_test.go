package xds

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/envoysim/simtest"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// envoysim (the Envoy double, a separate process in its own network
// namespace so its 15001/15006 listeners bind there) gets a mesh from the
// test control plane through the agent's xDS proxy, in SotW and in Delta:
// CDS, EDS for every service cluster, LDS, RDS for the HTTP ports, all
// ACKed, and it goes LIVE.
func TestEnvoysimThroughProxy(t *testing.T) {
	testenv.RequireRoot(t)
	mesh := controlplane.Mesh{Services: []controlplane.Service{
		{Name: "reviews", Namespace: "demo", VIP: "10.96.0.10", Ports: []controlplane.Port{{Port: 9080, Protocol: "http"}},
			Endpoints: []controlplane.Endpoint{{IP: "10.1.0.5"}, {IP: "10.1.0.6"}}},
		{Name: "db", Namespace: "demo", VIP: "10.96.0.11", Ports: []controlplane.Port{{Port: 5432}},
			Endpoints: []controlplane.Endpoint{{IP: "10.1.0.7"}}},
	}}
	for _, delta := range []bool{false, true} {
		t.Run(fmt.Sprintf("delta=%v", delta), func(t *testing.T) {
			cp := startCP(t, mesh)
			sock := startProxy(t, cp.Addr())
			ns := testenv.NewNetns(t, "xe")
			s := simtest.Start(t, simtest.Bootstrap{XDSSocket: sock, Delta: delta}.JSON(), simtest.Options{Netns: ns})
			s.WaitLive(t, 20*time.Second)

			st := s.Stats(t, `update_(success|rejected)$`)
			for _, name := range []string{"cluster_manager.cds.update_success", "cluster_manager.eds.update_success",
				"listener_manager.lds.update_success", "http.rds.update_success"} {
				if st[name] < 1 {
					t.Errorf("%s = %d, want at least 1 (stats %v)", name, st[name], st)
				}
			}
			for name, v := range st {
				if strings.HasSuffix(name, "update_rejected") && v > 0 {
					t.Errorf("%s = %d", name, v)
				}
			}
			rev, db := mesh.Services[0], mesh.Services[1]
			for _, c := range []string{controlplane.ClusterName(rev, 9080), controlplane.ClusterName(db, 5432)} {
				if st["cluster."+c+".update_success"] < 1 {
					t.Errorf("no EDS update for %s", c)
				}
			}

			// The virtual listeners are bound in envoysim's namespace; the
			// per-service ones are not (bind_to_port false).
			_, lst, err := s.Get("/listeners")
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"virtualOutbound::[::]:15001", "virtualInbound::[::]:15006", "10.96.0.10_9080::10.96.0.10:9080"} {
				if !strings.Contains(lst, want+"\n") {
					t.Errorf("/listeners lacks %q:\n%s", want, lst)
				}
			}

			// The control plane saw this mode's subscriptions, in Envoy's
			// order, and only ACKs.
			var order []string
			for _, e := range cp.Events() {
				if e.Delta != delta {
					t.Errorf("control plane got a %v request on a delta=%v run", e.Delta, delta)
				}
				if e.Error != "" {
					t.Errorf("NACK reached the control plane: %+v", e)
				}
				if e.Nonce == "" && len(order) < 4 && !slices.Contains(order, e.TypeURL) {
					order = append(order, e.TypeURL)
				}
			}
			want := []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType}
			if !slices.Equal(order, want) {
				t.Errorf("subscription order at the control plane = %v, want %v", order, want)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := cp.WaitFor(ctx, func(e controlplane.Event) bool {
				return e.TypeURL == resource.RouteType && slices.Contains(e.Names, "9080")
			}); err != nil {
				t.Errorf("no RDS subscription for route 9080: %v", err)
			}
			if code := s.Stop(t); code != 0 {
				t.Errorf("envoysim exit code %d after SIGTERM, want 0", code)
			}
		})
	}
}
