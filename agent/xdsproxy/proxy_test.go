package xdsproxy

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// Config flows both ways: requests (with the node, ClusterID and
// XDS_HEADER_ metadata) reach the control plane, responses reach Envoy,
// ACKs and NACKs go back up, and the name table is taken out for DNS.
func TestConfigFlowsBothWays(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			mesh := smallMesh(3)
			cp := startCP(t, controlplane.Config{}, mesh)
			tb := newTables()
			p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true, ClusterID: "Kubernetes",
				Headers: map[string]string{"X-Test": "yes"}, OnNameTable: tb.handle})
			c := dialEnvoy(t, p.socket, m.delta, "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local")

			if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			cds := recvType(t, c, cdsType)
			if cds.Count != 5 { // 3 services + PassthroughCluster + InboundPassthroughCluster
				t.Errorf("CDS has %d clusters, want 5", cds.Count)
			}
			first := waitCP(t, cp, "the CDS request", func(e controlplane.Event) bool { return e.TypeURL == cdsType })
			if first.NodeID != "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local" {
				t.Errorf("node id upstream = %q", first.NodeID)
			}
			if got := first.Metadata.Get("clusterid"); !cmp.Equal(got, []string{"Kubernetes"}) {
				t.Errorf("ClusterID metadata = %v", got)
			}
			if got := first.Metadata.Get("x-test"); !cmp.Equal(got, []string{"yes"}) {
				t.Errorf("XDS_HEADER metadata = %v", got)
			}
			if err := c.ACK(cds, nil); err != nil {
				t.Fatal(err)
			}
			waitCP(t, cp, "the CDS ACK", func(e controlplane.Event) bool {
				return e.TypeURL == cdsType && e.Nonce == cds.Nonce && e.Error == ""
			})

			// LDS triggers the agent's own NDS request.
			if err := c.Subscribe(ldsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			lds := recvType(t, c, ldsType)
			if lds.Count != 5 { // 3 services + virtualOutbound + virtualInbound
				t.Errorf("LDS has %d listeners, want 5", lds.Count)
			}
			select {
			case <-tb.ch:
			case <-time.After(10 * time.Second):
				t.Fatal("name table never reached the handler")
			}
			tb.mu.Lock()
			got := tb.got[0]
			tb.mu.Unlock()
			if diff := cmp.Diff(controlplane.NameTable(mesh), got); diff != "" {
				t.Errorf("name table (-want +got):\n%s", diff)
			}
			ndsAck := waitCP(t, cp, "the agent's NDS ACK", func(e controlplane.Event) bool {
				return e.TypeURL == nds.TypeURL && e.Nonce != ""
			})
			if ndsAck.Error != "" {
				t.Errorf("NDS was NACKed: %s", ndsAck.Error)
			}

			// A NACK from Envoy reaches the control plane with its message.
			names := []string{controlplane.ClusterName(mesh.Services[0], 8080)}
			if err := c.Subscribe(edsType, names, "", nil); err != nil {
				t.Fatal(err)
			}
			eds := recvType(t, c, edsType)
			if err := c.NACK(eds, names, "", "endpoint rejected by test"); err != nil {
				t.Fatal(err)
			}
			waitCP(t, cp, "the EDS NACK", func(e controlplane.Event) bool {
				return e.TypeURL == edsType && e.Nonce == eds.Nonce && e.Error == "endpoint rejected by test"
			})
			if n := testutil.ToFloat64(p.metrics.responses.WithLabelValues("cds")); n < 1 {
				t.Errorf("xds_proxy_responses{type=cds} = %v", n)
			}
			if p.LastConfigReceived().IsZero() {
				t.Error("LastConfigReceived is zero after responses")
			}
		})
	}
}

// A rejected name table is NACKed upstream by the agent, with the handler's
// error, and still never goes to Envoy.
func TestNameTableNACK(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			cp := startCP(t, controlplane.Config{}, smallMesh(2))
			tb := newTables()
			tb.fail = errors.New("table refused by test")
			p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true, OnNameTable: tb.handle})
			c := dialEnvoy(t, p.socket, m.delta, "n1")
			if err := c.Subscribe(ldsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			recvType(t, c, ldsType)
			waitCP(t, cp, "the NDS NACK", func(e controlplane.Event) bool {
				return e.TypeURL == nds.TypeURL && strings.Contains(e.Error, "table refused by test")
			})
		})
	}
}

// Without a name table handler (DNS off) NDS is never requested.
func TestNoNDSWhenDNSOff(t *testing.T) {
	cp := startCP(t, controlplane.Config{}, smallMesh(1))
	p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
	c := dialEnvoy(t, p.socket, false, "n1")
	if err := c.Subscribe(ldsType, nil, "", nil); err != nil {
		t.Fatal(err)
	}
	r := recvType(t, c, ldsType)
	if err := c.ACK(r, nil); err != nil {
		t.Fatal(err)
	}
	waitCP(t, cp, "the LDS ACK", func(e controlplane.Event) bool { return e.Nonce == r.Nonce })
	for _, e := range cp.Events() {
		if e.TypeURL == nds.TypeURL {
			t.Fatalf("NDS requested with DNS off: %+v", e)
		}
	}
}

// TLS with the root from XDS_ROOT_CA and the token read from disk; a wrong
// token is refused and nothing reaches Envoy.
func TestTLSAndToken(t *testing.T) {
	dir := t.TempDir()
	ca, err := controlplane.NewTestCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	tokenPath := filepath.Join(dir, "istio-token")
	cp := startCP(t, controlplane.Config{TLS: ca.Server, Token: "s3cret"}, smallMesh(2))
	// "localhost" in the address means the server name istiod.istio-system.svc.
	addr := strings.Replace(cp.Addr(), "127.0.0.1", "localhost", 1)

	t.Run("good token", func(t *testing.T) {
		if err := os.WriteFile(tokenPath, []byte("s3cret\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		p := startProxy(t, Config{DiscoveryAddress: addr, RootCAPath: ca.RootPath, TokenPath: tokenPath})
		c := dialEnvoy(t, p.socket, true, "tls-node")
		if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		if r := recvType(t, c, cdsType); r.Count != 4 {
			t.Errorf("CDS over TLS has %d clusters, want 4", r.Count)
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		if err := os.WriteFile(tokenPath, []byte("wrong"), 0o600); err != nil {
			t.Fatal(err)
		}
		p := startProxy(t, Config{DiscoveryAddress: addr, RootCAPath: ca.RootPath, TokenPath: tokenPath})
		c := dialEnvoy(t, p.socket, true, "tls-node")
		if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for testutil.ToFloat64(p.metrics.connFailures) < 2 {
			if time.Now().After(deadline) {
				t.Fatal("refused connections were not counted as failures")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if n := cp.Responses(cdsType); n != 1 { // only the good-token proxy's
			t.Errorf("control plane sent %d CDS responses, want 1", n)
		}
	})
	t.Run("wrong server name", func(t *testing.T) {
		p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), RootCAPath: ca.RootPath, TokenPath: tokenPath, ServerName: "evil.example"})
		c := dialEnvoy(t, p.socket, true, "tls-node")
		if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for testutil.ToFloat64(p.metrics.connFailures) < 1 {
			if time.Now().After(deadline) {
				t.Fatal("TLS with the wrong server name was not refused")
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// A second stream from Envoy closes the first.
func TestNewStreamReplacesOld(t *testing.T) {
	cp := startCP(t, controlplane.Config{}, smallMesh(1))
	p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
	c1 := dialEnvoy(t, p.socket, false, "n1")
	if err := c1.Subscribe(cdsType, nil, "", nil); err != nil {
		t.Fatal(err)
	}
	recvType(t, c1, cdsType)
	c2 := dialEnvoy(t, p.socket, false, "n1")
	if err := c2.Subscribe(cdsType, nil, "", nil); err != nil {
		t.Fatal(err)
	}
	recvType(t, c2, cdsType)
	_, err := c1.Recv()
	if status.Code(err) != codes.Aborted {
		t.Errorf("old stream ended with %v, want Aborted", err)
	}
}

// The socket directory is 0750, the socket 0666, and a stale socket from a
// previous run does not stop the proxy.
func TestSocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "proxy")
	sock := filepath.Join(dir, "XDS")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sock, nil, 0o600); err != nil { // stale leftover
		t.Fatal(err)
	}
	p := startProxy(t, Config{DiscoveryAddress: "127.0.0.1:1", Plaintext: true, SocketPath: sock})
	// Envoy can connect through the stale path.
	c := dialEnvoy(t, p.socket, false, "n1")
	if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p.socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o666 {
		t.Errorf("socket mode = %v, want socket 0666", st.Mode())
	}
	sub := filepath.Join(t.TempDir(), "a", "b", "XDS")
	startProxy(t, Config{DiscoveryAddress: "127.0.0.1:1", Plaintext: true, SocketPath: sub})
	dst, err := os.Stat(filepath.Dir(sub))
	if err != nil {
		t.Fatal(err)
	}
	if dst.Mode().Perm() != 0o750 {
		t.Errorf("socket dir mode = %v, want 0750", dst.Mode().Perm())
	}
}

func TestRunStopsCleanly(t *testing.T) {
	p, err := New(Config{DiscoveryAddress: "127.0.0.1:1", Plaintext: true, SocketPath: filepath.Join(t.TempDir(), "XDS")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := p.Run(ctx); err != nil {
		t.Errorf("Run after cancel = %v, want nil", err)
	}
}

// Envoy's connections get the large send buffer (as large as the kernel's
// net.core.wmem_max lets them), so a push is not held up waiting for the
// netpoller to notice room in a small one.
func TestEnvoyConnSendBuffer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "XDS")
	lis, err := listenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	got := sockOpt(t, sc, syscall.SO_SNDBUF)
	want := envoySendBuffer
	if b, err := os.ReadFile("/proc/sys/net/core/wmem_max"); err == nil {
		if max, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && max < want {
			want = max
		}
	}
	want *= 2 // the kernel doubles what it is asked for
	if got != want {
		t.Errorf("SO_SNDBUF of an accepted Envoy connection is %d, want %d", got, want)
	}
	// The client's side is the kernel default, smaller: the setting
	// really is the listener's doing.
	if def := sockOpt(t, c, syscall.SO_SNDBUF); def >= got {
		t.Errorf("default SO_SNDBUF %d is not below the agent's %d", def, got)
	}
}

func sockOpt(t *testing.T, c net.Conn, opt int) int {
	t.Helper()
	raw, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := raw.Control(func(fd uintptr) { v, gerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}
