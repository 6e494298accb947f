package xdsproxy

import (
	"context"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
)

// The control plane dies and comes back, repeatedly: Envoy's stream stays
// open, the agent reconnects and replays the subscriptions, and Envoy gets
// the new configuration. DNS keeps its last table meanwhile.
func TestControlPlaneRestarts(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			cp := startCP(t, controlplane.Config{}, smallMesh(2))
			tb := newTables()
			p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true, OnNameTable: tb.handle})
			c := dialEnvoy(t, p.socket, m.delta, "n1")
			for _, typ := range []string{cdsType, ldsType} {
				if err := c.Subscribe(typ, nil, "", nil); err != nil {
					t.Fatal(err)
				}
				if err := c.ACK(recvType(t, c, typ), nil); err != nil {
					t.Fatal(err)
				}
			}
			for round := range 3 {
				cp.Stop()
				deadline := time.Now().Add(5 * time.Second)
				for p.Connected() {
					if time.Now().After(deadline) {
						t.Fatal("proxy still connected after the control plane stopped")
					}
					time.Sleep(10 * time.Millisecond)
				}
				time.Sleep(100 * time.Millisecond) // a few failed reconnects
				n := 3 + round
				if err := cp.SetMesh(smallMesh(n)); err != nil {
					t.Fatal(err)
				}
				if err := cp.Start(); err != nil {
					t.Fatal(err)
				}
				// The same Envoy stream gets the new clusters.
				for {
					r := recvType(t, c, cdsType)
					if err := c.ACK(r, nil); err != nil {
						t.Fatal(err)
					}
					if m.delta && r.Count == 1 || !m.delta && r.Count == n+2 { // + 2 passthrough clusters
						break // delta: only the new service is sent
					}
				}
			}
			if got := testutil.ToFloat64(p.metrics.connTerms.WithLabelValues("cancelled")) +
				testutil.ToFloat64(p.metrics.connTerms.WithLabelValues("error")); got < 3 {
				t.Errorf("istiod_connection_terminations = %v, want >= 3", got)
			}
			if testutil.ToFloat64(p.metrics.connFailures) < 1 {
				t.Error("no connection failures counted during outages")
			}
		})
	}
}

// Envoy restarts while the control plane is down: the new Envoy gets the
// last accepted configuration from the agent, its ACKs of it stay local,
// and when the control plane is back normal proxying resumes.
func TestEnvoyRestartDuringOutage(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			mesh := smallMesh(3)
			cp := startCP(t, controlplane.Config{}, mesh)
			p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
			c := dialEnvoy(t, p.socket, m.delta, "n1")
			accepted := map[string]int{}
			for _, typ := range []string{cdsType, ldsType} {
				if err := c.Subscribe(typ, nil, "", nil); err != nil {
					t.Fatal(err)
				}
				r := recvType(t, c, typ)
				accepted[typ] = r.Count
				if err := c.ACK(r, nil); err != nil {
					t.Fatal(err)
				}
				waitCP(t, cp, "the ACK", func(e controlplane.Event) bool { return e.Nonce == r.Nonce })
			}
			cp.Stop()
			c.Close()

			c2 := dialEnvoy(t, p.socket, m.delta, "n1")
			for _, typ := range []string{cdsType, ldsType} {
				if err := c2.Subscribe(typ, nil, "", nil); err != nil {
					t.Fatal(err)
				}
				r := recvType(t, c2, typ)
				if r.Count != accepted[typ] {
					t.Errorf("cached %s has %d resources, want %d", shortType(typ), r.Count, accepted[typ])
				}
				if !strings.HasPrefix(r.Nonce, "outrigger-cache-") {
					t.Errorf("cached response nonce %q", r.Nonce)
				}
				if err := c2.ACK(r, nil); err != nil {
					t.Fatal(err)
				}
			}
			if n := testutil.ToFloat64(p.metrics.envoyResponses.WithLabelValues("cds", "cache")); n != 1 {
				t.Errorf("cached CDS responses = %v, want 1", n)
			}

			if err := cp.SetMesh(smallMesh(4)); err != nil {
				t.Fatal(err)
			}
			if err := cp.Start(); err != nil {
				t.Fatal(err)
			}
			r := recvType(t, c2, cdsType)
			want := 6 // 4 services + 2 passthrough clusters
			if m.delta {
				want = 1 // Envoy told the control plane what it holds
			}
			if r.Count != want {
				t.Errorf("CDS after the outage has %d clusters, want %d", r.Count, want)
			}
			if err := c2.ACK(r, nil); err != nil {
				t.Fatal(err)
			}
			waitCP(t, cp, "the ACK after the outage", func(e controlplane.Event) bool { return e.Nonce == r.Nonce })
			for _, e := range cp.Events() {
				if strings.HasPrefix(e.Nonce, "outrigger-cache-") {
					t.Errorf("an ACK of a cached response went upstream: %+v", e)
				}
			}
		})
	}
}

// A new Envoy stream while the control plane is up gets the control
// plane's response only: the last-known-good copy is for outages, and
// sending it first would push Envoy (and the agent) everything twice.
func TestFreshStreamNotServedFromCacheWhileConnected(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			cp := startCP(t, controlplane.Config{}, smallMesh(3))
			p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
			c := dialEnvoy(t, p.socket, m.delta, "n1")
			if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			r := recvType(t, c, cdsType)
			if err := c.ACK(r, nil); err != nil {
				t.Fatal(err)
			}
			waitCP(t, cp, "the ACK", func(e controlplane.Event) bool { return e.Nonce == r.Nonce })

			c2 := dialEnvoy(t, p.socket, m.delta, "n1")
			if err := c2.Subscribe(cdsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			r2 := recvType(t, c2, cdsType)
			if strings.HasPrefix(r2.Nonce, "outrigger-cache-") {
				t.Errorf("fresh stream served from the cache (nonce %q) while the control plane is up", r2.Nonce)
			}
			if n := testutil.ToFloat64(p.metrics.envoyResponses.WithLabelValues("cds", "cache")); n != 0 {
				t.Errorf("cached CDS responses = %v, want 0", n)
			}
		})
	}
}

// A stream on which the control plane never answers is replaced by the
// watchdog.
func TestStalledStreamIsReplaced(t *testing.T) {
	var streams atomic.Int32
	addr := startSilentServer(t, &streams)
	p := startProxy(t, Config{DiscoveryAddress: addr, Plaintext: true, StallTimeout: 100 * time.Millisecond})
	c := dialEnvoy(t, p.socket, false, "n1")
	if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for streams.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d upstream streams; the stalled one was not replaced", streams.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if testutil.ToFloat64(p.metrics.recycles) < 2 {
		t.Error("recycles not counted")
	}
}

// silentADS accepts ADS streams, reads requests and never answers.
type silentADS struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	streams *atomic.Int32
}

func (s silentADS) StreamAggregatedResources(st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	s.streams.Add(1)
	for {
		if _, err := st.Recv(); err != nil {
			return nil
		}
	}
}

func startSilentServer(t *testing.T, streams *atomic.Int32) string {
	t.Helper()
	addr, lis := listenUpstream(t)
	g := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, silentADS{streams: streams})
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return addr
}

// A slow Envoy that reads nothing, behind a control plane that pushes
// without waiting for ACKs (as istiod does): Envoy's requests still reach
// the control plane (nothing deadlocks); SotW responses are coalesced, so
// the agent keeps reading upstream and holds one per type; Delta responses
// push back on the control plane instead of piling up. Once Envoy reads it
// ends on the last push.
func TestSlowEnvoy(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			const pushes = 20
			ps := startPushServer(t, pushes, 300, 2300) // 700 KB per push
			p := startProxy(t, Config{DiscoveryAddress: ps.addr, Plaintext: true})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			// A fixed 64 KiB window: grpc's window growth (BDP) would let
			// the client library buffer what a slow Envoy does not read.
			c, err := controlplane.DialAgent(ctx, p.socket, m.delta, envoyNode("slow"),
				grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			// The control plane pushes; the agent must keep reading Envoy.
			time.Sleep(500 * time.Millisecond)
			if err := c.Subscribe(ldsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			ps.waitRequest(t, ldsType)
			if m.delta {
				if n := ps.sent.Load(); n >= pushes {
					t.Errorf("the control plane pushed all %d responses into a slow Envoy; no backpressure", n)
				}
			} else {
				ps.waitSent(t, pushes)
				if n := testutil.ToFloat64(p.metrics.coalesced.WithLabelValues("cds")); n < pushes/2 {
					t.Errorf("coalesced = %v, want most of %d pushes", n, pushes)
				}
			}
			// Envoy catches up and ends on the last push.
			want := "v" + strconv.Itoa(pushes)
			// SotW: versions only move forward, and Envoy sees a few of the
			// pushes, never the run of them: one queued in gRPC's write
			// quota, one blocked in SendMsg, the slot, and whatever the
			// proxy was still reading from upstream when Envoy started to
			// read (the control plane's "sent" is not the proxy's
			// "received"). The coalescing itself is counted above.
			deadline := time.Now().Add(20 * time.Second)
			var seen []string
			last := 0
			for time.Now().Before(deadline) {
				r := recvType(t, c, cdsType)
				vn, _ := strconv.Atoi(strings.TrimPrefix(r.Version, "v"))
				if vn <= last {
					t.Errorf("version went backwards: %s after v%d", r.Version, last)
				}
				last = vn
				if r.Version == want {
					if !m.delta && len(seen) > pushes/4 {
						t.Errorf("slow Envoy got %d of %d pushes before the last (%v); want them coalesced", len(seen), pushes, seen)
					}
					return
				}
				seen = append(seen, r.Version)
			}
			t.Fatalf("Envoy never got %s", want)
		})
	}
}

// pushServer sends n large CDS responses as fast as the stream takes them.
type pushServer struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	addr     string
	n, count int
	size     int
	sent     atomic.Int32
	mu       sync.Mutex
	requests []string
}

func startPushServer(t *testing.T, n, count, size int) *pushServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ps := &pushServer{addr: lis.Addr().String(), n: n, count: count, size: size}
	g := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, ps)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return ps
}

func (ps *pushServer) record(typ string) bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	first := true
	for _, r := range ps.requests {
		if r == typ {
			first = false
		}
	}
	ps.requests = append(ps.requests, typ)
	return first
}

func (ps *pushServer) waitRequest(t *testing.T, typ string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ps.mu.Lock()
		for _, r := range ps.requests {
			if r == typ {
				ps.mu.Unlock()
				return
			}
		}
		ps.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("request for %s never reached the control plane", typ)
}

func (ps *pushServer) waitSent(t *testing.T, n int32) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ps.sent.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("control plane could send only %d of %d pushes", ps.sent.Load(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitCDS records the requests recv returns, in the background for the
// stream's life, and waits for the first CDS request (false: the stream
// ended first).
func (ps *pushServer) waitCDS(ctx context.Context, recv func() (string, error)) bool {
	start := make(chan struct{}, 1)
	go func() {
		for {
			typeURL, err := recv()
			if err != nil {
				return
			}
			if ps.record(typeURL) && typeURL == cdsType {
				start <- struct{}{}
			}
		}
	}()
	select {
	case <-start:
		return true
	case <-ctx.Done():
		return false
	}
}

func (ps *pushServer) payload() []byte { return []byte(strings.Repeat("x", ps.size)) }

func (ps *pushServer) StreamAggregatedResources(st discovery.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	if !ps.waitCDS(st.Context(), func() (string, error) { r, err := st.Recv(); return r.GetTypeUrl(), err }) {
		return nil
	}
	body := ps.payload()
	for i := 1; i <= ps.n; i++ {
		resp := &discovery.DiscoveryResponse{TypeUrl: cdsType, VersionInfo: "v" + strconv.Itoa(i), Nonce: strconv.Itoa(i)}
		for range ps.count {
			resp.Resources = append(resp.Resources, &anypb.Any{TypeUrl: cdsType, Value: body})
		}
		if err := st.Send(resp); err != nil {
			return nil
		}
		ps.sent.Add(1)
	}
	<-st.Context().Done()
	return nil
}

func (ps *pushServer) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	if !ps.waitCDS(st.Context(), func() (string, error) { r, err := st.Recv(); return r.GetTypeUrl(), err }) {
		return nil
	}
	body := ps.payload()
	for i := 1; i <= ps.n; i++ {
		v := "v" + strconv.Itoa(i)
		resp := &discovery.DeltaDiscoveryResponse{TypeUrl: cdsType, SystemVersionInfo: v, Nonce: strconv.Itoa(i)}
		for j := range ps.count {
			resp.Resources = append(resp.Resources, &discovery.Resource{Name: "c" + strconv.Itoa(j), Version: v,
				Resource: &anypb.Any{TypeUrl: cdsType, Value: body}})
		}
		if err := st.Send(resp); err != nil {
			return nil
		}
		ps.sent.Add(1)
	}
	<-st.Context().Done()
	return nil
}

// listenUpstream listens for a hand-written control plane on a port the
// test control plane picks.
func listenUpstream(t *testing.T) (string, net.Listener) {
	t.Helper()
	cp := startCP(t, controlplane.Config{}, controlplane.Mesh{}) // for the port only
	addr := cp.Addr()
	cp.Stop()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return addr, lis
}

// A new Envoy stream reuses the working upstream connection (no new TCP or
// TLS handshake with istiod); a stream that failed because the control
// plane went away drops it, and the reconnection dials afresh.
func TestUpstreamConnectionReuse(t *testing.T) {
	cp := startCP(t, controlplane.Config{}, smallMesh(2))
	p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
	shared := func() io.Closer {
		p.upMu.Lock()
		defer p.upMu.Unlock()
		return p.upConn
	}
	getCDS := func(c *controlplane.Client) {
		t.Helper()
		if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.ACK(recvType(t, c, cdsType), nil); err != nil {
			t.Fatal(err)
		}
	}

	c1 := dialEnvoy(t, p.socket, false, "n1")
	getCDS(c1)
	first := shared()
	if first == nil {
		t.Fatal("no shared upstream connection while a stream is up")
	}
	c1.Close()
	c2 := dialEnvoy(t, p.socket, false, "n1") // Envoy restarted
	getCDS(c2)
	if got := shared(); got != first {
		t.Fatalf("the restarted Envoy's stream got a new upstream connection (%p, was %p)", got, first)
	}

	cp.Stop()
	deadline := time.Now().Add(5 * time.Second)
	for shared() == first {
		if time.Now().After(deadline) {
			t.Fatal("the connection whose stream failed is still shared")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := cp.Start(); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	c3 := dialEnvoy(t, p.socket, false, "n1")
	getCDS(c3)
	if got := shared(); got == nil || got == first {
		t.Fatalf("after the control plane came back: shared connection %p, the failed one was %p", got, first)
	}
}

// Envoys that leave while a large push is on its way, again and again, are
// not upstream failures: the upstream connection is kept, and the next
// Envoy gets the whole push on it.
func TestUpstreamConnectionSurvivesCancelledPushes(t *testing.T) {
	mesh := controlplane.GenerateMesh(1200) // ~2.8 MB of CDS: most of the 4 MiB window
	cp := startCP(t, controlplane.Config{}, mesh)
	p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
	shared := func() io.Closer {
		p.upMu.Lock()
		defer p.upMu.Unlock()
		return p.upConn
	}
	cdsRequests := func() int {
		n := 0
		for _, e := range cp.Events() {
			if e.TypeURL == cdsType && e.Nonce == "" {
				n++
			}
		}
		return n
	}
	var first io.Closer
	for i := range 8 {
		c := dialEnvoy(t, p.socket, false, "n1")
		if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		// Leave once the control plane has the request, at a different
		// point of its answer each time.
		deadline := time.Now().Add(5 * time.Second)
		for cdsRequests() <= i {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the control plane never got the CDS request", i)
			}
			time.Sleep(time.Millisecond)
		}
		time.Sleep(time.Duration(3+2*i) * time.Millisecond)
		c.Close()
		if i == 0 {
			if first = shared(); first == nil {
				t.Fatal("no upstream connection kept after the first Envoy left")
			}
		}
	}
	c := dialEnvoy(t, p.socket, false, "n1")
	if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
		t.Fatal(err)
	}
	r := recvType(t, c, cdsType)
	if want := len(mesh.Services); r.Count < want {
		t.Fatalf("%d clusters after 8 cancelled pushes, want at least %d", r.Count, want)
	}
	if got := shared(); got != first {
		t.Errorf("the upstream connection was replaced (%p, was %p): cancelled streams are not failures", got, first)
	}
}

// A stream whose response turns out malformed is the control plane's
// failure, found however far into the response: the kept connection is
// dropped and the next attempt dials afresh, on either transport (on
// cut-through the error comes only once the response, already being
// forwarded, is complete).
func TestUpstreamConnectionDroppedOnBadResponse(t *testing.T) {
	good, err := proto.Marshal(bigSotw(cdsType, 100, 1000)) // ~100 KB: forwarded while it arrives
	if err != nil {
		t.Fatal(err)
	}
	// A nonce field that claims more bytes than the message has.
	bad := append(good, byte(sotwNonce)<<3|2, 100, 'x')
	addr, lis := listenUpstream(t)
	var conns, streams atomic.Int32
	g := grpc.NewServer(grpc.ForceServerCodec(rawBytes{}), grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
		streams.Add(1)
		var req []byte
		if err := st.RecvMsg(&req); err != nil {
			return err
		}
		if err := st.SendMsg(&bad); err != nil {
			return err
		}
		<-st.Context().Done() // the stream stays up: only the response is wrong
		return nil
	}))
	go func() { _ = g.Serve(countingListener{lis, &conns}) }()
	t.Cleanup(g.Stop)

	p := startProxy(t, Config{DiscoveryAddress: addr, Plaintext: true})
	// Envoy stays until its stream fails (the agent fails it when the bad
	// response was already partly forwarded), then reconnects, so every
	// upstream stream ends because of its response, never because Envoy
	// left.
	deadline := time.Now().Add(10 * time.Second)
	for streams.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream streams, want the agent to retry", streams.Load())
		}
		c := dialEnvoy(t, p.socket, false, "n1")
		if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
			t.Fatal(err)
		}
		failed := make(chan struct{})
		go func() {
			defer close(failed)
			for {
				if _, err := c.Recv(); err != nil {
					return
				}
			}
		}()
	wait:
		for streams.Load() < 3 {
			select {
			case <-failed:
				break wait
			case <-time.After(time.Millisecond):
			}
		}
	}
	if n, s := conns.Load(), streams.Load(); n < s {
		t.Errorf("%d streams on %d connections: a connection whose stream got a malformed response was kept", s, n)
	}
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// rawBytes is a gRPC codec for messages already encoded.
type rawBytes struct{}

func (rawBytes) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }

func (rawBytes) Unmarshal(b []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), b...)
	return nil
}

func (rawBytes) Name() string { return "proto" }
