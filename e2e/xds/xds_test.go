// Package xds holds the end-to-end tests of the xDS path: the agent's proxy
// between the test control plane and an Envoy stand-in (envoysim or a small
// ADS client), and a real proxyless gRPC client resolving through the
// agent's socket.
package xds

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/outrigger-mesh/outrigger/agent/grpcxds"
	"github.com/outrigger-mesh/outrigger/agent/xdsproxy"
	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func startCP(t testing.TB, mesh controlplane.Mesh) *controlplane.Server {
	t.Helper()
	cp, err := controlplane.New(controlplane.Config{}, mesh)
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	return cp
}

func startProxy(t testing.TB, upstream string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "etc", "istio", "proxy", "XDS")
	p, err := xdsproxy.New(xdsproxy.Config{SocketPath: sock, DiscoveryAddress: upstream, Plaintext: true,
		TokenPath: filepath.Join(t.TempDir(), "none"), InitialBackoff: 20 * time.Millisecond, MaxBackoff: 500 * time.Millisecond},
		zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	waitFile(t, sock)
	return sock
}

func waitFile(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", path)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A proxyless gRPC client (grpc-go's xds resolver, a separate process with
// GRPC_XDS_BOOTSTRAP set before it starts) resolves a service through the
// agent's socket and calls it.
func TestProxylessGRPC(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	healthpb.RegisterHealthServer(g, health.NewServer())
	go func() { _ = g.Serve(lis) }()
	defer g.Stop()
	port := uint32(lis.Addr().(*net.TCPAddr).Port)

	svc := controlplane.Service{Name: "greeter", Namespace: "default", VIP: "10.96.0.1",
		Ports: []controlplane.Port{{Port: port, Protocol: "grpc"}}, Endpoints: []controlplane.Endpoint{{IP: "127.0.0.1"}}}
	cp := startCP(t, controlplane.Mesh{Services: []controlplane.Service{svc}})
	sock := startProxy(t, cp.Addr())
	bs := filepath.Join(t.TempDir(), "etc", "istio", "proxy", "grpc-bootstrap.json")
	if err := grpcxds.Write(bs, grpcxds.Bootstrap{SocketPath: sock, NodeID: "sidecar~127.0.0.1~client.default~default.svc.cluster.local",
		Metadata: map[string]any{"NAMESPACE": "default"}}); err != nil {
		t.Fatal(err)
	}
	bin := testenv.Build(t, "./e2e/xds/grpcclient")
	cmd := exec.Command(bin, "-target", "xds:///"+controlplane.GRPCTarget(svc, port), "-timeout", "30s")
	cmd.Env = append(os.Environ(), "GRPC_XDS_BOOTSTRAP="+bs)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("proxyless client: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "SERVING") {
		t.Fatalf("proxyless client output:\n%s", out)
	}
	// It went through the agent: the control plane saw the gRPC node.
	var sawGRPC bool
	for _, e := range cp.Events() {
		if e.TypeURL == resource.ListenerType && strings.Contains(strings.Join(e.Names, ","), "greeter") {
			sawGRPC = true
		}
	}
	if !sawGRPC {
		t.Error("the control plane never saw the client's LDS request for the API listener")
	}
}

// A 3000-service mesh (a CDS response of about 7 MB) flows through the
// proxy in both modes.
func TestLargeMesh(t *testing.T) {
	cp := startCP(t, controlplane.GenerateMesh(3000))
	sock := startProxy(t, cp.Addr())
	for _, delta := range []bool{false, true} {
		c, err := controlplane.DialAgent(context.Background(), sock, delta, &core.Node{Id: "big"})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Subscribe(resource.ClusterType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		r, err := c.Recv()
		if err != nil {
			t.Fatal(err)
		}
		size := proto.Size(r.Sotw) + proto.Size(r.Delta)
		if r.Count != 3002 || size < 6<<20 { // 3000 services + 2 passthrough clusters
			t.Errorf("delta=%v: CDS with %d clusters, %d bytes; want 3002 clusters, >= 6 MiB", delta, r.Count, size)
		}
		c.Close()
	}
}
