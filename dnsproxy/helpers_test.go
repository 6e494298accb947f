package dnsproxy

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testSearch is a pod's resolv.conf search list in namespace "ns".
var testSearch = []string{"ns.svc.cluster.local", "svc.cluster.local", "cluster.local"}

// testTable is a name table as istiod sends it to a proxy in "ns".
func testTable() *nds.NameTable {
	return &nds.NameTable{Table: map[string]*nds.NameInfo{
		"productpage.ns.svc.cluster.local": {IPs: []string{"10.0.0.1"}, Registry: "Kubernetes", Shortname: "productpage", Namespace: "ns"},
		"reviews.other.svc.cluster.local":  {IPs: []string{"10.0.0.2", "fd00::2"}, Registry: "Kubernetes", Shortname: "reviews", Namespace: "other", AltHosts: []string{"reviews.legacy"}},
		"v6only.ns.svc.cluster.local":      {IPs: []string{"fd00::3"}, Registry: "Kubernetes", Shortname: "v6only", Namespace: "ns"},
		"db.ns.svc.remote.local":           {IPs: []string{"10.0.0.4"}, Registry: "Kubernetes", Shortname: "db", Namespace: "ns"},
		"api.example.com":                  {IPs: []string{"192.0.2.10"}, Registry: "External"},
		"*.example.com":                    {IPs: []string{"192.0.2.20"}, Registry: "External"},
		"*.deep.example.com":               {IPs: []string{"192.0.2.30"}, Registry: "External"},
		"lb.example.org":                   {IPs: []string{"192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"}, Registry: "External"},
		"bad.example.org":                  {IPs: []string{"not-an-ip"}, Registry: "External"},
	}}
}

// fakeUpstream is a miekg/dns resolver on 127.0.0.1:<random> (UDP and TCP)
// that counts the queries it sees.
type fakeUpstream struct {
	addr    netip.AddrPort
	udpHits atomic.Int32
	tcpHits atomic.Int32
	mu      sync.Mutex
	handler func(w dns.ResponseWriter, r *dns.Msg, tcp bool)
}

func (f *fakeUpstream) set(h func(w dns.ResponseWriter, r *dns.Msg, tcp bool)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handler = h
}

func (f *fakeUpstream) hits() int { return int(f.udpHits.Load() + f.tcpHits.Load()) }

func startUpstream(t *testing.T, h func(w dns.ResponseWriter, r *dns.Msg, tcp bool)) *fakeUpstream {
	t.Helper()
	f := &fakeUpstream{handler: h}
	var pc net.PacketConn
	var l net.Listener
	for attempt := 0; ; attempt++ { // the UDP port may be taken for TCP
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		f.addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
		if l, err = net.Listen("tcp", f.addr.String()); err == nil {
			break
		}
		pc.Close()
		if attempt > 10 {
			t.Fatal(err)
		}
	}
	serve := func(tcp bool) dns.HandlerFunc {
		return func(w dns.ResponseWriter, r *dns.Msg) {
			if tcp {
				f.tcpHits.Add(1)
			} else {
				f.udpHits.Add(1)
			}
			f.mu.Lock()
			h := f.handler
			f.mu.Unlock()
			h(w, r, tcp)
		}
	}
	var servers []*dns.Server
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: serve(false)}, {Listener: l, Handler: serve(true)}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		servers = append(servers, srv)
	}
	t.Cleanup(func() {
		for _, s := range servers {
			_ = s.Shutdown()
		}
	})
	return f
}

// answerA answers every question with one A record of ttl.
func answerA(ip string, ttl uint32) func(w dns.ResponseWriter, r *dns.Msg, tcp bool) {
	return func(w dns.ResponseWriter, r *dns.Msg, _ bool) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Answer = append(m.Answer, &dns.A{
			Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl},
			A:   net.ParseIP(ip),
		})
		_ = w.WriteMsg(m)
	}
}

// testServer is a running proxy with a controllable clock.
type testServer struct {
	*Server
	addr  string
	reg   *prometheus.Registry
	clock atomic.Int64 // unix nanos
}

func (ts *testServer) advance(d time.Duration) { ts.clock.Add(int64(d)) }

// startServer runs a proxy on 127.0.0.1:<random>. table nil: no table yet.
func startServer(t *testing.T, cfg Config, table *nds.NameTable) *testServer {
	t.Helper()
	if cfg.ListenAddr == "" {
		cfg.ListenAddr = "127.0.0.1:0"
	}
	if cfg.Search == nil {
		cfg.Search = testSearch
	}
	if cfg.Namespace == "" {
		cfg.Namespace = "ns"
		cfg.Domain = "ns.svc.cluster.local"
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = writeResolvConf(t, "# no nameservers\n")
	}
	if cfg.ForwardTimeout == 0 {
		cfg.ForwardTimeout = time.Second
	}
	ts := &testServer{reg: prometheus.NewRegistry()}
	cfg.Registerer = ts.reg
	s, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ts.Server = s
	ts.clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	s.now = func() time.Time { return time.Unix(0, ts.clock.Load()) }
	if table != nil {
		s.UpdateNameTable(table)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	select {
	case <-s.Listening():
	case err := <-done:
		cancel()
		t.Fatalf("Run: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v", err)
		}
	})
	ts.addr = s.Addrs()[0].String()
	return ts
}

// query sends one question over net ("udp" or "tcp").
func (ts *testServer) query(t *testing.T, netw, name string, qtype uint16, edns uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	return exchange(t, netw, ts.addr, m)
}

func exchange(t *testing.T, netw, addr string, m *dns.Msg) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: netw, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s query %s %s: %v", netw, m.Question[0].Name, dns.TypeToString[m.Question[0].Qtype], err)
	}
	if r.Id != m.Id {
		t.Fatalf("answer ID %d, want %d", r.Id, m.Id)
	}
	return r
}

// rrStrings renders answers compactly, for go-cmp.
func rrStrings(rrs []dns.RR) []string {
	var out []string
	for _, rr := range rrs {
		out = append(out, rr.String())
	}
	return out
}

// counterValue reads a counter.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
