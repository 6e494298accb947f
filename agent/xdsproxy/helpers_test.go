package xdsproxy

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/internal/nds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var modes = []struct {
	name  string
	delta bool
}{{"sotw", false}, {"delta", true}}

const (
	cdsType = resource.ClusterType
	ldsType = resource.ListenerType
	edsType = resource.EndpointType
)

func smallMesh(n int) controlplane.Mesh {
	m := controlplane.GenerateMesh(n)
	m.ClusterPadding = 0
	return m
}

func startCP(t *testing.T, cfg controlplane.Config, mesh controlplane.Mesh) *controlplane.Server {
	t.Helper()
	cp, err := controlplane.New(cfg, mesh)
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	return cp
}

// tables collects the name tables the proxy hands to the DNS side.
type tables struct {
	mu   sync.Mutex
	got  []*nds.NameTable
	fail error
	ch   chan struct{}
}

func newTables() *tables { return &tables{ch: make(chan struct{}, 100)} }

func (tb *tables) handle(t *nds.NameTable) error {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.got = append(tb.got, t)
	tb.ch <- struct{}{}
	return tb.fail
}

type testProxy struct {
	*Proxy
	socket string
	reg    *prometheus.Registry
}

// startProxy runs a proxy towards addr; cfg fields left zero get test
// values.
func startProxy(t *testing.T, cfg Config) *testProxy {
	t.Helper()
	dir := t.TempDir()
	if cfg.SocketPath == "" {
		cfg.SocketPath = filepath.Join(dir, "etc", "istio", "proxy", "XDS")
	}
	if cfg.TokenPath == "" {
		cfg.TokenPath = filepath.Join(dir, "no-token")
	}
	if cfg.InitialBackoff == 0 {
		cfg.InitialBackoff, cfg.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = time.Second
	}
	if cfg.Transport == "" {
		// make test runs the package once per transport.
		cfg.Transport = os.Getenv("XDSPROXY_TEST_TRANSPORT")
	}
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	p, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(cfg.SocketPath); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("socket never appeared")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return &testProxy{Proxy: p, socket: cfg.SocketPath, reg: reg}
}

func envoyNode(id string) *core.Node { return &core.Node{Id: id, Cluster: "test"} }

func dialEnvoy(t *testing.T, socket string, delta bool, id string) *controlplane.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := controlplane.DialAgent(context.Background(), socket, delta, envoyNode(id))
	_ = ctx
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// recvType reads responses until one of typeURL arrives, failing on any
// response of a type Envoy must never see.
func recvType(t *testing.T, c *controlplane.Client, typeURL string) *controlplane.Response {
	t.Helper()
	type res struct {
		r   *controlplane.Response
		err error
	}
	ch := make(chan res, 1)
	go func() {
		for {
			r, err := c.Recv()
			if err != nil || r.TypeURL == typeURL || r.TypeURL == nds.TypeURL {
				ch <- res{r, err}
				return
			}
		}
	}()
	select {
	case got := <-ch:
		if got.err != nil {
			t.Fatalf("recv %s: %v", typeURL, got.err)
		}
		if got.r.TypeURL == nds.TypeURL {
			t.Fatal("the name table reached Envoy")
		}
		return got.r
	case <-time.After(10 * time.Second):
		t.Fatalf("no %s response within 10s", typeURL)
	}
	return nil
}

func waitCP(t *testing.T, cp *controlplane.Server, what string, match func(controlplane.Event) bool) controlplane.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := cp.WaitFor(ctx, match)
	if err != nil {
		t.Fatalf("control plane never saw %s: %v", what, err)
	}
	return e
}
