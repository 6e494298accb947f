package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/envoysim/simtest"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// injector is the istio-init command line of an injected sidecar.
var injector = []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// captureListeners is what istiod sends a sidecar, reduced: the 15001
// virtual listener (use_original_dst) handing connections to per-service
// listeners that are not bound, a passthrough for everything else, and
// the 15006 inbound listener passing through from 127.0.0.6.
func captureListeners(peer string) (listeners, clusters []string) {
	tcp := func(stat, cluster string) string {
		return fmt.Sprintf(`{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
		  "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": %q, "cluster": %q}}`, stat, cluster)
	}
	origDst := `{"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}`
	listeners = []string{
		fmt.Sprintf(`{"name": "virtualOutbound", "traffic_direction": "OUTBOUND", "use_original_dst": true,
		  "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
		  "listener_filters": [%s], "filter_chains": [{"filters": [%s]}]}`, origDst, tcp("PassthroughCluster", "PassthroughCluster")),
		fmt.Sprintf(`{"name": "10.96.0.5_8080", "traffic_direction": "OUTBOUND", "bind_to_port": false,
		  "address": {"socket_address": {"address": "10.96.0.5", "port_value": 8080}},
		  "filter_chains": [{"filters": [%s]}]}`, tcp("outbound|8080||echo", "outbound|8080||echo.demo.svc.cluster.local")),
		`{"name": "0.0.0.0_80", "traffic_direction": "OUTBOUND", "bind_to_port": false,
		  "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
		  "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
		    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
		    "stat_prefix": "outbound_0.0.0.0_80",
		    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
		    "route_config": {"name": "80", "virtual_hosts": [{"name": "web", "domains": ["web.demo.svc.cluster.local", "10.96.0.6"],
		      "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "outbound|80||web.demo.svc.cluster.local"}}]}]}}}]}]}`,
		fmt.Sprintf(`{"name": "virtualInbound", "traffic_direction": "INBOUND",
		  "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
		  "listener_filters": [%s], "filter_chains": [{"filters": [%s]}]}`, origDst, tcp("InboundPassthroughCluster", "InboundPassthroughCluster")),
	}
	static := func(name, addr string, port int) string {
		return fmt.Sprintf(`{"name": %q, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": %q,
		  "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": %q, "port_value": %d}}}}]}]}}`, name, name, addr, port)
	}
	clusters = []string{
		`{"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"}`,
		`{"name": "InboundPassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s",
		  "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}}}`,
		static("outbound|8080||echo.demo.svc.cluster.local", peer, 8080),
		static("outbound|80||web.demo.svc.cluster.local", peer, 8081),
	}
	return listeners, clusters
}

// serveLines accepts in ns on addr and answers each connection's first
// line with "<tag> from <remote>: <line>"; it records the remote
// addresses.
func serveLines(t *testing.T, ns *testenv.Netns, addr, tag string) func() []string {
	t.Helper()
	var ln net.Listener
	var err error
	ns.In(t, func() { ln, err = net.Listen("tcp", addr) })
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var remotes []string
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			remotes = append(remotes, c.RemoteAddr().String())
			mu.Unlock()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			fmt.Fprintf(c, "%s from %s: %s", tag, c.RemoteAddr(), line)
			c.Close()
		}
	}()
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), remotes...)
	}
}

// dialIn connects from ns to addr, sends a line and returns the answer.
func dialIn(t *testing.T, ns *testenv.Netns, addr, line string) string {
	t.Helper()
	var c net.Conn
	var err error
	ns.In(t, func() { c, err = net.DialTimeout("tcp", addr, 3*time.Second) })
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s\n", line)
	b, _ := io.ReadAll(c)
	return string(b)
}

// In a pod namespace with the real istio-iptables rules, envoysim running
// as uid 1337 receives the app's outbound connections on 15001, reads the
// original destination, hands them to the per-service listener (TCP and
// HTTP by Host) or passes them through, and proxies inbound connections
// from 15006 to the app from 127.0.0.6. Its own upstream connections are
// not captured (uid 1337), or nothing would arrive.
func TestCaptureAsProxyUID(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "ip", "iptables-restore")
	p := testenv.NewPair(t, "es", false)
	if out, err := p.Pod.RunErr(testenv.Outrigger(t), injector...); err != nil {
		t.Fatalf("outrigger istio-iptables: %v\n%s", err, out)
	}
	echoSeen := serveLines(t, p.Peer, p.PeerIP+":8080", "echo")
	webLn := func() net.Listener {
		var ln net.Listener
		var err error
		p.Peer.In(t, func() { ln, err = net.Listen("tcp", p.PeerIP+":8081") })
		if err != nil {
			t.Fatal(err)
		}
		return ln
	}()
	web := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "web host=%s from=%s", r.Host, r.RemoteAddr)
	})}
	go func() { _ = web.Serve(webLn) }()
	t.Cleanup(func() { web.Close() })
	appSeen := serveLines(t, p.Pod, "0.0.0.0:9090", "app")

	listeners, clusters := captureListeners(p.PeerIP)
	s := simtest.Start(t, simtest.Bootstrap{Listeners: listeners, Clusters: clusters}.JSON(),
		simtest.Options{Netns: p.Pod, AsProxyUID: true})
	s.WaitLive(t, 10*time.Second)

	// 1. A service VIP that exists nowhere: only the per-service listener
	// behind 15001 can answer, through its cluster's endpoint.
	if got, want := dialIn(t, p.Pod, "10.96.0.5:8080", "vip"), "echo from "+p.PodIP+":"; !strings.HasPrefix(got, want) || !strings.HasSuffix(got, ": vip\n") {
		t.Errorf("VIP answer = %q, want %q...", got, want)
	}
	// 2. No listener for the destination: passthrough to it.
	if got := dialIn(t, p.Pod, p.PeerIP+":8080", "direct"); !strings.HasSuffix(got, ": direct\n") {
		t.Errorf("passthrough answer = %q", got)
	}
	// 3. HTTP to another VIP, routed by Host through the 0.0.0.0:80
	// listener's route.
	// (The connection is made on a thread in the pod's namespace; an
	// http.Client would dial from another thread, outside it.)
	var hc net.Conn
	var err error
	p.Pod.In(t, func() { hc, err = net.DialTimeout("tcp", "10.96.0.6:80", 3*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	_ = hc.SetDeadline(time.Now().Add(5 * time.Second))
	req, _ := http.NewRequest("GET", "http://10.96.0.6/hello", nil)
	req.Host = "web.demo.svc.cluster.local"
	req.Close = true
	var body string
	if err := req.Write(hc); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.ReadResponse(bufio.NewReader(hc), req); err != nil {
		body = err.Error()
	} else {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
	}
	hc.Close()
	if want := "web host=web.demo.svc.cluster.local from=" + p.PodIP + ":"; !strings.HasPrefix(body, want) {
		t.Errorf("HTTP answer = %q, want %q...", body, want)
	}
	// 4. Inbound: the peer calls the app; 15006 passes it on from
	// 127.0.0.6.
	if got := dialIn(t, p.Peer, p.PodIP+":9090", "in"); !strings.HasPrefix(got, "app from 127.0.0.6:") {
		t.Errorf("inbound answer = %q, want the app to see 127.0.0.6", got)
	}
	if n := len(echoSeen()); n != 2 {
		t.Errorf("echo server saw %d connections, want 2", n)
	}
	if r := appSeen(); len(r) != 1 {
		t.Errorf("app saw %v, want one connection", r)
	}

	// One access-log line per connection on stdout.
	s.Eventually(t, 5*time.Second, "four access-log lines", func() bool { return strings.Count(s.Stdout(), "\n") >= 4 })
	out := s.Stdout()
	for _, want := range []string{
		"[envoysim] outbound " + p.PodIP + ":",
		"-> 10.96.0.5:8080 (original destination) listener=virtualOutbound>10.96.0.5_8080 cluster=outbound|8080||echo.demo.svc.cluster.local upstream=" + p.PeerIP + ":8080 bytes=4/",
		"-> " + p.PeerIP + ":8080 (original destination) listener=virtualOutbound cluster=PassthroughCluster upstream=" + p.PeerIP + ":8080",
		"-> 10.96.0.6:80 (original destination) listener=virtualOutbound>0.0.0.0_80 cluster=outbound|80||web.demo.svc.cluster.local upstream=" + p.PeerIP + ":8081 host=web.demo.svc.cluster.local path=/hello",
		"[envoysim] inbound " + p.PeerIP + ":",
		"-> " + p.PodIP + ":9090 (original destination) listener=virtualInbound cluster=InboundPassthroughCluster upstream=" + p.PodIP + ":9090 bytes=3/",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("access log lacks %q:\n%s", want, out)
		}
	}
	if os.Getenv("ENVOYSIM_TEST_SHOW_LOG") != "" {
		t.Logf("access log:\n%s", out)
	}
}
