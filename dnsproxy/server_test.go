package dnsproxy

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"
	"go.uber.org/zap/zaptest"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

func TestNameTableAnswers(t *testing.T) {
	up := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, _ bool) {
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeNameError)
		_ = w.WriteMsg(m)
	})
	ts := startServer(t, Config{Upstreams: up.Addrs()}, testTable())

	tests := []struct {
		name  string
		q     string
		qtype uint16
		// want are the answers; nil with forwarded means NXDOMAIN from upstream.
		want      []string
		forwarded bool
	}{
		{name: "fqdn", q: "productpage.ns.svc.cluster.local.", qtype: dns.TypeA,
			want: []string{"productpage.ns.svc.cluster.local.\t30\tIN\tA\t10.0.0.1"}},
		{name: "short name in own namespace", q: "productpage.", qtype: dns.TypeA,
			want: []string{"productpage.\t30\tIN\tA\t10.0.0.1"}},
		{name: "name.namespace", q: "reviews.other.", qtype: dns.TypeA,
			want: []string{"reviews.other.\t30\tIN\tA\t10.0.0.2"}},
		{name: "name.namespace.svc", q: "reviews.other.svc.", qtype: dns.TypeAAAA,
			want: []string{"reviews.other.svc.\t30\tIN\tAAAA\tfd00::2"}},
		{name: "short name of another namespace is not ours", q: "reviews.", qtype: dns.TypeA, forwarded: true},
		{name: "alt host", q: "reviews.legacy.", qtype: dns.TypeA,
			want: []string{"reviews.legacy.\t30\tIN\tA\t10.0.0.2"}},
		{name: "missing family is NODATA", q: "productpage.ns.svc.cluster.local.", qtype: dns.TypeAAAA, want: []string{}},
		{name: "v6 only", q: "v6only.", qtype: dns.TypeAAAA, want: []string{"v6only.\t30\tIN\tAAAA\tfd00::3"}},
		{name: "v6 only asked for A", q: "v6only.", qtype: dns.TypeA, want: []string{}},
		{name: "other cluster domain: fqdn only", q: "db.ns.svc.remote.local.", qtype: dns.TypeA,
			want: []string{"db.ns.svc.remote.local.\t30\tIN\tA\t10.0.0.4"}},
		{name: "other cluster domain: no short name", q: "db.ns.", qtype: dns.TypeA, forwarded: true},
		{name: "non-Kubernetes: exact", q: "api.example.com.", qtype: dns.TypeA,
			want: []string{"api.example.com.\t30\tIN\tA\t192.0.2.10"}},
		{name: "wildcard", q: "www.example.com.", qtype: dns.TypeA,
			want: []string{"www.example.com.\t30\tIN\tA\t192.0.2.20"}},
		{name: "most specific wildcard", q: "a.b.deep.example.com.", qtype: dns.TypeA,
			want: []string{"a.b.deep.example.com.\t30\tIN\tA\t192.0.2.30"}},
		{name: "wildcard does not match its apex", q: "example.com.", qtype: dns.TypeA, forwarded: true},
		{name: "search expansion of an external host is a CNAME", q: "api.example.com.ns.svc.cluster.local.", qtype: dns.TypeA,
			want: []string{
				"api.example.com.ns.svc.cluster.local.\t30\tIN\tCNAME\tapi.example.com.",
				"api.example.com.\t30\tIN\tA\t192.0.2.10",
			}},
		{name: "search expansion of a short name", q: "reviews.other.ns.svc.cluster.local.", qtype: dns.TypeA,
			want: []string{
				"reviews.other.ns.svc.cluster.local.\t30\tIN\tCNAME\treviews.other.",
				"reviews.other.\t30\tIN\tA\t10.0.0.2",
			}},
		{name: "search expansion of a wildcard", q: "x.example.com.ns.svc.cluster.local.", qtype: dns.TypeA,
			want: []string{
				"x.example.com.ns.svc.cluster.local.\t30\tIN\tCNAME\tx.example.com.",
				"x.example.com.\t30\tIN\tA\t192.0.2.20",
			}},
		{name: "search expansion, missing family: CNAME only", q: "api.example.com.ns.svc.cluster.local.", qtype: dns.TypeAAAA,
			want: []string{"api.example.com.ns.svc.cluster.local.\t30\tIN\tCNAME\tapi.example.com."}},
		{name: "a real name is not treated as an expansion", q: "productpage.ns.svc.cluster.local.", qtype: dns.TypeA,
			want: []string{"productpage.ns.svc.cluster.local.\t30\tIN\tA\t10.0.0.1"}},
		{name: "case-insensitive, question case kept", q: "ProductPage.NS.svc.Cluster.local.", qtype: dns.TypeA,
			want: []string{"ProductPage.NS.svc.Cluster.local.\t30\tIN\tA\t10.0.0.1"}},
		{name: "entry without valid IPs is skipped", q: "bad.example.org.", qtype: dns.TypeA, forwarded: true},
		{name: "other qtypes are forwarded", q: "productpage.ns.svc.cluster.local.", qtype: dns.TypeTXT, forwarded: true},
		{name: "unknown name forwarded", q: "unknown.test.", qtype: dns.TypeA, forwarded: true},
	}
	for _, tc := range tests {
		for _, netw := range []string{"udp", "tcp"} {
			t.Run(tc.name+"/"+netw, func(t *testing.T) {
				before := up.hits()
				r := ts.query(t, netw, tc.q, tc.qtype, 0)
				if tc.forwarded {
					if r.Rcode != dns.RcodeNameError || up.hits() == before {
						t.Fatalf("want NXDOMAIN from the upstream, got %s (upstream hits %d->%d)", dns.RcodeToString[r.Rcode], before, up.hits())
					}
					return
				}
				if up.hits() != before {
					t.Errorf("table hit reached the upstream")
				}
				if r.Rcode != dns.RcodeSuccess || !r.Authoritative || !r.Response || !r.RecursionDesired {
					t.Errorf("header: rcode %s aa %v qr %v rd %v", dns.RcodeToString[r.Rcode], r.Authoritative, r.Response, r.RecursionDesired)
				}
				if got := r.Question[0].Name; got != tc.q {
					t.Errorf("question %q, want the client's %q", got, tc.q)
				}
				got := rrStrings(r.Answer)
				if got == nil {
					got = []string{}
				}
				if diff := cmp.Diff(tc.want, got); diff != "" {
					t.Errorf("answers (-want +got):\n%s", diff)
				}
			})
		}
	}
}

func (f *fakeUpstream) Addrs() []netip.AddrPort { return []netip.AddrPort{f.addr} }

func TestServfailBeforeFirstTable(t *testing.T) {
	up := startUpstream(t, answerA("192.0.2.99", 60))
	ts := startServer(t, Config{Upstreams: up.Addrs()}, nil)
	if ts.Ready() || ts.NameTable() != nil {
		t.Fatal("ready before the first table")
	}
	for _, q := range []string{"productpage.ns.svc.cluster.local.", "example.net."} {
		if r := ts.query(t, "udp", q, dns.TypeA, 0); r.Rcode != dns.RcodeServerFailure {
			t.Errorf("%s before the table: %s, want SERVFAIL", q, dns.RcodeToString[r.Rcode])
		}
	}
	ts.UpdateNameTable(testTable())
	if !ts.Ready() {
		t.Fatal("not ready after the first table")
	}
	if r := ts.query(t, "udp", "productpage.", dns.TypeA, 0); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Errorf("after the table: %v", r)
	}
	if up.hits() != 0 {
		t.Errorf("upstream asked %d times before the table", up.hits())
	}
}

func TestRespondBeforeSyncForwards(t *testing.T) {
	up := startUpstream(t, answerA("192.0.2.99", 60))
	ts := startServer(t, Config{Upstreams: up.Addrs(), RespondBeforeSync: true}, nil)
	r := ts.query(t, "udp", "example.net.", dns.TypeA, 0)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("got %v", r)
	}
}

func TestRoundRobin(t *testing.T) {
	ts := startServer(t, Config{Upstreams: nil}, testTable())
	firsts := map[string]bool{}
	for range 8 {
		r := ts.query(t, "udp", "lb.example.org.", dns.TypeA, 0)
		if len(r.Answer) != 4 {
			t.Fatalf("want 4 answers, got %v", r.Answer)
		}
		firsts[r.Answer[0].(*dns.A).A.String()] = true
	}
	if len(firsts) < 2 {
		t.Errorf("the first answer never changed: %v", firsts)
	}
}

func TestTableTruncation(t *testing.T) {
	var ips []string
	for i := range 100 {
		ips = append(ips, fmt.Sprintf("10.1.%d.%d", i/250, i%250+1))
	}
	table := &nds.NameTable{Table: map[string]*nds.NameInfo{"big.example.org": {IPs: ips, Registry: "External"}}}
	ts := startServer(t, Config{}, table)
	tests := []struct {
		netw      string
		edns      uint16
		wantTC    bool
		wantMaxSz int
	}{
		{"udp", 0, true, 512},
		{"udp", 1232, true, 1232},
		{"udp", 4096, false, 4096},
		{"tcp", 0, false, 65535},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s/edns%d", tc.netw, tc.edns), func(t *testing.T) {
			m := new(dns.Msg)
			m.SetQuestion("big.example.org.", dns.TypeA)
			if tc.edns > 0 {
				m.SetEdns0(tc.edns, false)
			}
			c := &dns.Client{Net: tc.netw, UDPSize: 65535}
			r, _, err := c.Exchange(m, ts.addr)
			if err != nil {
				t.Fatal(err)
			}
			r.Compress = true
			packed, _ := r.Pack()
			if r.Truncated != tc.wantTC || len(packed) > tc.wantMaxSz {
				t.Errorf("TC %v (want %v), %d bytes (max %d)", r.Truncated, tc.wantTC, len(packed), tc.wantMaxSz)
			}
			if !tc.wantTC && len(r.Answer) != 100 {
				t.Errorf("%d answers, want 100", len(r.Answer))
			}
			if tc.wantTC && (len(r.Answer) == 0 || len(r.Answer) == 100) {
				t.Errorf("%d answers: want as many as fit", len(r.Answer))
			}
			if tc.edns > 0 && r.IsEdns0() == nil {
				t.Errorf("no OPT record in the answer to an EDNS query")
			}
		})
	}
}

func TestListenAddrValidation(t *testing.T) {
	tests := []struct {
		addr    string
		allow   bool
		wantErr string
	}{
		{addr: "localhost:15053"},
		{addr: ":15053"},
		{addr: "127.0.0.1:0"},
		{addr: "[::1]:0"},
		{addr: "10.1.2.3:15053", wantErr: "DNS_PROXY_ADDR \"10.1.2.3:15053\": 10.1.2.3 is not a loopback address"},
		{addr: "0.0.0.0:15053", wantErr: "not a loopback address"},
		{addr: "10.1.2.3:15053", allow: true},
		{addr: "localhost", wantErr: "want host:port"},
		{addr: "localhost:99999", wantErr: "is not a number"},
		{addr: "pod.example:53", wantErr: "must be localhost or an IP"},
	}
	for _, tc := range tests {
		t.Run(tc.addr, func(t *testing.T) {
			_, err := New(Config{ListenAddr: tc.addr, AllowNonLoopback: tc.allow, Upstreams: []netip.AddrPort{}, Search: []string{}, ResolvConf: writeResolvConf(t, "nameserver 192.0.2.53\n")}, zaptest.NewLogger(t))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestResolvConf(t *testing.T) {
	path := writeResolvConf(t, "search ns.svc.cluster.local svc.cluster.local\nnameserver 192.0.2.53\nnameserver fd00::53\noptions ndots:5\n")
	ups, search, err := readResolvConf(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(ups); got != "[192.0.2.53:53 [fd00::53]:53]" {
		t.Errorf("upstreams %s", got)
	}
	if diff := cmp.Diff([]string{"ns.svc.cluster.local", "svc.cluster.local"}, search); diff != "" {
		t.Error(diff)
	}
	if _, _, err := readResolvConf(t.TempDir() + "/missing"); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing file: %v", err)
	}
}

func TestUpdateWhileQuerying(t *testing.T) {
	ts := startServer(t, Config{}, testTable())
	alt := testTable()
	alt.Table["productpage.ns.svc.cluster.local"] = &nds.NameInfo{IPs: []string{"10.9.9.9"}, Registry: "Kubernetes", Shortname: "productpage", Namespace: "ns"}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				ts.UpdateNameTable(alt)
			} else {
				ts.UpdateNameTable(testTable())
			}
			_ = ts.NameTable()
		}
	})
	for _, netw := range []string{"udp", "tcp"} {
		wg.Go(func() {
			for range 200 {
				r := ts.query(t, netw, "productpage.", dns.TypeA, 0)
				if len(r.Answer) != 1 {
					t.Errorf("answers %v", r.Answer)
					return
				}
				if ip := r.Answer[0].(*dns.A).A.String(); ip != "10.0.0.1" && ip != "10.9.9.9" {
					t.Errorf("answer %s from neither table", ip)
				}
			}
		})
	}
	time.Sleep(10 * time.Millisecond)
	for ts.m.requests != nil && counterValue(ts.m.requests) < 400 {
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
}

func TestDebugNameTable(t *testing.T) {
	ts := startServer(t, Config{}, testTable())
	got := ts.NameTable()
	for _, name := range []string{"productpage.ns.svc.cluster.local", "productpage.", "productpage.ns.", "productpage.ns.svc.", "reviews.other.", "reviews.legacy."} {
		if got.Table[name] == nil {
			t.Errorf("/debug/ndsz table lacks %q", name)
		}
	}
	if got.Table["reviews."] != nil {
		t.Errorf("short name of another namespace listed")
	}
	// The debug shape loads back into the same answers.
	ts2 := startServer(t, Config{}, got)
	r := ts2.query(t, "udp", "productpage.ns.svc.", dns.TypeA, 0)
	if len(r.Answer) != 1 {
		t.Errorf("reloaded debug table: %v", r.Answer)
	}
}

func TestMetrics(t *testing.T) {
	ts := startServer(t, Config{}, testTable())
	ts.query(t, "udp", "productpage.", dns.TypeA, 0)
	ts.query(t, "tcp", "productpage.", dns.TypeAAAA, 0)
	if got := counterValue(ts.m.requests); got != 2 {
		t.Errorf("dns_requests_total %v, want 2", got)
	}
	mfs, err := ts.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	want := []string{"dns_cache_entries", "dns_cache_hits_total", "dns_cache_misses_total", "dns_queries_total", "dns_requests_total",
		"dns_upstream_failures_total", "dns_upstream_request_duration_seconds", "dns_upstream_requests_total"}
	if diff := cmp.Diff(want, names); diff != "" {
		t.Errorf("metric names (-want +got):\n%s", diff)
	}
	if got := counterValue(ts.m.queries[0][resultTable]); got != 1 {
		t.Errorf(`dns_queries_total{type="A",result="table"} = %v`, got)
	}
}

func writeResolvConf(t *testing.T, body string) string {
	t.Helper()
	p := t.TempDir() + "/resolv.conf"
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
