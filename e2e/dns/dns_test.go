// Package dns_test runs "outrigger dns-proxy" inside a pod network namespace
// with Istio's DNS capture rules, and checks that the application's own
// resolvers (glibc through getent, the Go resolver, dig) get mesh names from
// the agent and everything else from the pod's resolver.
package dns_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

const (
	resolverIP = "10.96.0.10" // the pod's nameserver, like kube-dns's ClusterIP
	proxyUID   = "1337"
)

// A mesh name table as istiod would send it to a proxy in namespace "shop".
const nameTable = `{"table": {
  "productpage.shop.svc.cluster.local": {"ips": ["10.0.0.1"], "registry": "Kubernetes", "shortname": "productpage", "namespace": "shop"},
  "reviews.other.svc.cluster.local": {"ips": ["10.0.0.2", "fd00::2"], "registry": "Kubernetes", "shortname": "reviews", "namespace": "other"},
  "api.partner.example": {"ips": ["192.0.2.10"], "registry": "External"}
}}`

// Helper mode: the test binary re-executed inside the namespace resolves
// names with the pure Go resolver.
func TestMain(m *testing.M) {
	if names := os.Getenv("OUTRIGGER_E2E_GO_RESOLVE"); names != "" {
		r := &net.Resolver{PreferGo: true}
		for _, n := range strings.Split(names, ",") {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			addrs, err := r.LookupHost(ctx, n)
			cancel()
			if err != nil {
				fmt.Printf("%s error %v\n", n, err)
				continue
			}
			// The order of A and AAAA answers is not part of the contract.
			slices.Sort(addrs)
			fmt.Printf("%s %s\n", n, strings.Join(addrs, " "))
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// upstream is the pod's resolver, served from this test process but bound
// inside the pod namespace: it knows one external name and counts queries.
type upstream struct {
	queries atomic.Int32
	names   chanLog
}

type chanLog struct{ ch chan string }

func (u *upstream) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	u.queries.Add(1)
	select {
	case u.names.ch <- r.Question[0].Name:
	default:
	}
	m := new(dns.Msg)
	m.SetReply(r)
	q := r.Question[0]
	switch {
	case strings.EqualFold(q.Name, "external.test.") && q.Qtype == dns.TypeA:
		m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(198, 51, 100, 7)}}
	case strings.EqualFold(q.Name, "external.test."):
	default:
		m.Rcode = dns.RcodeNameError
	}
	m.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Name: "test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 30},
		Ns: "ns.test.", Mbox: "h.test.", Serial: 1, Refresh: 1, Retry: 1, Expire: 1, Minttl: 30}}
	if len(m.Answer) > 0 {
		m.Ns = nil
	}
	_ = w.WriteMsg(m)
}

// listenInNetns opens UDP and TCP sockets on addr inside the namespace.
func listenInNetns(t *testing.T, ns *testenv.Netns, addr string) (net.PacketConn, net.Listener) {
	t.Helper()
	var pc net.PacketConn
	var err error
	ns.In(t, func() { pc, err = net.ListenPacket("udp", addr) })
	if err != nil {
		t.Fatal(err)
	}
	return pc, ns.Listen(t, "tcp", addr)
}

func startUpstream(t *testing.T, ns *testenv.Netns) *upstream {
	t.Helper()
	u := &upstream{names: chanLog{ch: make(chan string, 1000)}}
	pc, l := listenInNetns(t, ns, net.JoinHostPort(resolverIP, "53"))
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: u}, {Listener: l, Handler: u}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return u
}

// captureRules are Istio's DNS capture rules (istio-iptables --redirect-dns),
// reduced to the pod's resolver and written directly.
const captureRules = `*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp -d ` + resolverIP + `/32 --dport 53 -m owner ! --uid-owner ` + proxyUID + ` -j REDIRECT --to-port 15053
-A OUTPUT -p tcp -d ` + resolverIP + `/32 --dport 53 -m owner ! --uid-owner ` + proxyUID + ` -j REDIRECT --to-ports 15053
COMMIT
`

// pod is a namespace with a resolver, capture rules and the agent's DNS
// proxy running as the proxy uid.
type pod struct {
	ns *testenv.Netns
	up *upstream
}

func setup(t *testing.T) *pod {
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "ip", "iptables-restore", "dig", "getent", "setpriv")
	ns := testenv.NewNetns(t, "dns")
	// The resolver's address lives on lo (no dummy module needed).
	ns.Run(t, "ip", "addr", "add", resolverIP+"/32", "dev", "lo")

	// ip netns exec bind-mounts /etc/netns/<name>/resolv.conf over
	// /etc/resolv.conf for everything it runs: the app and the agent.
	etc := filepath.Join("/etc/netns", ns.Name)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(etc) })
	resolv := "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver " + resolverIP + "\noptions ndots:5 attempts:1 timeout:2\n"
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte(resolv), 0o644); err != nil {
		t.Fatal(err)
	}

	up := startUpstream(t, ns)

	cmd := ns.Command("iptables-restore", "--noflush")
	cmd.Stdin = strings.NewReader(captureRules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("iptables-restore: %v\n%s", err, out)
	}

	// The agent runs as uid 1337: the binary and table must be readable.
	dir, err := os.MkdirTemp("", "outrigger-e2e-dns-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "outrigger")
	copyFile(t, testenv.Outrigger(t), bin)
	table := filepath.Join(dir, "table.json")
	if err := os.WriteFile(table, []byte(nameTable), 0o644); err != nil {
		t.Fatal(err)
	}
	agent := ns.Command("setpriv", "--reuid="+proxyUID, "--regid="+proxyUID, "--clear-groups",
		bin, "dns-proxy", "--name-table", table, "--namespace", "shop")
	agent.Env = append(os.Environ(), "DNS_PROXY_ADDR=localhost:15053")
	logf, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	agent.Stdout, agent.Stderr = logf, logf
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- agent.Wait() }()
	t.Cleanup(func() {
		_ = agent.Process.Signal(unix.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = agent.Process.Kill()
			<-exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("agent log:\n%s", b)
		}
	})
	// Ready when a captured query gets the mesh answer.
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := ns.RunErr("dig", "+short", "+tries=1", "+time=1", "@"+resolverIP, "productpage.shop.svc.cluster.local")
		if strings.TrimSpace(out) == "10.0.0.1" {
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("agent exited: %v\n%s", err, b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent never answered through the capture (last: %q)", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return &pod{ns: ns, up: up}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestAppResolversThroughCapture(t *testing.T) {
	p := setup(t)

	t.Run("glibc getent", func(t *testing.T) {
		tests := []struct{ name, want string }{
			{"productpage", "10.0.0.1"},                        // short name, search walk
			{"productpage.shop", "10.0.0.1"},                   // name.namespace
			{"reviews.other", "10.0.0.2"},                      // another namespace
			{"api.partner.example", "192.0.2.10"},              // ServiceEntry host, via the search CNAME
			{"productpage.shop.svc.cluster.local", "10.0.0.1"}, // fqdn
			{"external.test", "198.51.100.7"},                  // not in the mesh: the pod's resolver
		}
		for _, tc := range tests {
			out, err := p.ns.RunErr("getent", "ahostsv4", tc.name)
			if err != nil || !strings.Contains(out, tc.want) {
				t.Errorf("getent ahostsv4 %s: %q %v, want %s", tc.name, out, err, tc.want)
			}
		}
		if out, err := p.ns.RunErr("getent", "hosts", "nothing.invalid"); err == nil {
			t.Errorf("getent hosts nothing.invalid resolved: %q", out)
		}
	})

	t.Run("Go resolver", func(t *testing.T) {
		self, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		cmd := p.ns.Command(self, "-test.run=^$")
		cmd.Env = append(os.Environ(), "OUTRIGGER_E2E_GO_RESOLVE=productpage,reviews.other,external.test")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		for _, want := range []string{"productpage 10.0.0.1", "reviews.other 10.0.0.2 fd00::2", "external.test 198.51.100.7"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("Go resolver output lacks %q:\n%s", want, out)
			}
		}
	})

	t.Run("dig", func(t *testing.T) {
		for _, proto := range []string{"+notcp", "+tcp"} {
			out := p.ns.Run(t, "dig", proto, "+short", "@"+resolverIP, "reviews.other.svc")
			if strings.TrimSpace(out) != "10.0.0.2" {
				t.Errorf("dig %s reviews.other.svc: %q", proto, out)
			}
			// Known host, missing family: NOERROR and no records.
			out = p.ns.Run(t, "dig", proto, "@"+resolverIP, "AAAA", "productpage.shop.svc.cluster.local")
			if !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, "ANSWER: 0") || !strings.Contains(out, " aa ") && !strings.Contains(out, " aa;") {
				t.Errorf("dig %s AAAA productpage: want authoritative NODATA:\n%s", proto, out)
			}
		}
	})

	t.Run("mesh names never reach the pod's resolver", func(t *testing.T) {
		before := p.up.queries.Load()
		p.ns.Run(t, "dig", "+short", "@"+resolverIP, "productpage.shop.svc.cluster.local")
		p.ns.Run(t, "getent", "ahostsv4", "productpage")
		if got := p.up.queries.Load(); got != before {
			t.Errorf("the resolver saw %d mesh queries", got-before)
		}
		// The proxy uid is not captured: its queries reach the resolver.
		out := p.ns.Run(t, "setpriv", "--reuid="+proxyUID, "--regid="+proxyUID, "--clear-groups",
			"dig", "+short", "@"+resolverIP, "external.test")
		if strings.TrimSpace(out) != "198.51.100.7" || p.up.queries.Load() == before {
			t.Errorf("uid %s query was not sent to the resolver directly: %q", proxyUID, out)
		}
	})
}
