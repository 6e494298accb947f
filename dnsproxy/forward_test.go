package dnsproxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// bigAnswer answers with n TXT records of 100 bytes (about 4 KB for 34),
// truncated (TC, no records) over UDP when truncUDP.
func bigAnswer(n int, truncUDP bool) func(w dns.ResponseWriter, r *dns.Msg, tcp bool) {
	return func(w dns.ResponseWriter, r *dns.Msg, tcp bool) {
		m := new(dns.Msg)
		m.SetReply(r)
		if truncUDP && !tcp {
			m.Truncated = true
			_ = w.WriteMsg(m)
			return
		}
		for i := range n {
			m.Answer = append(m.Answer, &dns.TXT{
				Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 300},
				Txt: []string{fmt.Sprintf("%03d-%096d", i, 0)},
			})
		}
		if o := r.IsEdns0(); o != nil {
			m.SetEdns0(o.UDPSize(), false)
		}
		_ = w.WriteMsg(m)
	}
}

func TestForwardRelaysAnswer(t *testing.T) {
	var sawEDNS atomic.Uint32
	up := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, tcp bool) {
		if o := r.IsEdns0(); o != nil {
			sawEDNS.Store(uint32(o.UDPSize()))
		}
		answerA("192.0.2.99", 60)(w, r, tcp)
	})
	ts := startServer(t, Config{Upstreams: up.Addrs()}, testTable())
	for _, netw := range []string{"udp", "tcp"} {
		r := ts.query(t, netw, "WwW.Example.NET.", dns.TypeA, 0)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "192.0.2.99" {
			t.Fatalf("%s: %v", netw, r)
		}
		if r.Question[0].Name != "WwW.Example.NET." {
			t.Errorf("question case lost: %s", r.Question[0].Name)
		}
		if r.IsEdns0() != nil {
			t.Errorf("OPT record in the answer to a query without EDNS")
		}
	}
	if got := sawEDNS.Load(); got != ourUDPSize {
		t.Errorf("upstream saw EDNS size %d, want %d", got, ourUDPSize)
	}
}

func TestForwardLargeAnswers(t *testing.T) {
	tests := []struct {
		name     string
		truncUDP bool
	}{
		{"upstream sends 4 KB over UDP", false},
		{"upstream truncates UDP, full over TCP", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := startUpstream(t, bigAnswer(34, tc.truncUDP))
			ts := startServer(t, Config{Upstreams: up.Addrs(), CacheDisabled: true}, testTable())

			// A client with a 4 KB EDNS buffer gets everything over UDP.
			r := ts.query(t, "udp", "big.example.net.", dns.TypeTXT, 4096)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 34 || r.Truncated {
				t.Fatalf("EDNS 4096: rcode %s, %d answers, TC %v", dns.RcodeToString[r.Rcode], len(r.Answer), r.Truncated)
			}
			if tc.truncUDP && up.tcpHits.Load() == 0 {
				t.Errorf("no TCP retry after a truncated upstream answer")
			}
			// A plain UDP client gets what fits in 512 bytes, with TC: never SERVFAIL.
			r = ts.query(t, "udp", "big.example.net.", dns.TypeTXT, 0)
			if r.Rcode != dns.RcodeSuccess || !r.Truncated || len(r.Answer) >= 34 {
				t.Fatalf("no EDNS: rcode %s, %d answers, TC %v", dns.RcodeToString[r.Rcode], len(r.Answer), r.Truncated)
			}
			// Over TCP: everything.
			r = ts.query(t, "tcp", "big.example.net.", dns.TypeTXT, 0)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 34 || r.Truncated {
				t.Fatalf("TCP: rcode %s, %d answers, TC %v", dns.RcodeToString[r.Rcode], len(r.Answer), r.Truncated)
			}
		})
	}
}

func TestForwardTruncatedAndTCPFails(t *testing.T) {
	// The upstream truncates over UDP and its TCP side never answers: the
	// client still gets the truncated answer with TC, not SERVFAIL.
	up := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, tcp bool) {
		if tcp {
			time.Sleep(400 * time.Millisecond)
			return
		}
		bigAnswer(34, true)(w, r, tcp)
	})
	ts := startServer(t, Config{Upstreams: up.Addrs(), ForwardTimeout: 200 * time.Millisecond, CacheDisabled: true}, testTable())
	r := ts.query(t, "udp", "big.example.net.", dns.TypeTXT, 0)
	if r.Rcode != dns.RcodeSuccess || !r.Truncated {
		t.Fatalf("rcode %s TC %v, want NOERROR with TC", dns.RcodeToString[r.Rcode], r.Truncated)
	}
}

// blackhole is a UDP socket that reads and never answers.
func blackhole(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestForwardTimeoutAndFallback(t *testing.T) {
	good := startUpstream(t, answerA("192.0.2.99", 60))
	dead := blackhole(t)

	t.Run("all upstreams time out: SERVFAIL", func(t *testing.T) {
		ts := startServer(t, Config{Upstreams: []netip.AddrPort{dead}, ForwardTimeout: 100 * time.Millisecond}, testTable())
		start := time.Now()
		r := ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		if r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v with a 100ms forward timeout", d)
		}
		if counterValue(ts.m.upstreamFailures) != 1 {
			t.Errorf("dns_upstream_failures_total %v", counterValue(ts.m.upstreamFailures))
		}
	})
	t.Run("sequential falls back to the next upstream", func(t *testing.T) {
		ts := startServer(t, Config{Upstreams: []netip.AddrPort{dead, good.addr}, ForwardTimeout: 100 * time.Millisecond, CacheDisabled: true}, testTable())
		for range 4 { // random order: both orders happen
			r := ts.query(t, "udp", "example.net.", dns.TypeA, 0)
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("rcode %s answers %v", dns.RcodeToString[r.Rcode], r.Answer)
			}
		}
	})
	t.Run("parallel answers from the fast upstream", func(t *testing.T) {
		ts := startServer(t, Config{Upstreams: []netip.AddrPort{dead, good.addr}, ForwardTimeout: 2 * time.Second, ForwardParallel: true, CacheDisabled: true}, testTable())
		start := time.Now()
		r := ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("rcode %s answers %v", dns.RcodeToString[r.Rcode], r.Answer)
		}
		if d := time.Since(start); d >= 2*time.Second {
			t.Errorf("waited for the dead upstream (%v)", d)
		}
	})
	t.Run("upstream SERVFAIL falls back to the next", func(t *testing.T) {
		sf := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, _ bool) {
			m := new(dns.Msg)
			m.SetRcode(r, dns.RcodeServerFailure)
			_ = w.WriteMsg(m)
		})
		ts := startServer(t, Config{Upstreams: []netip.AddrPort{sf.addr, good.addr}, CacheDisabled: true}, testTable())
		for range 4 {
			if r := ts.query(t, "udp", "example.net.", dns.TypeA, 0); r.Rcode != dns.RcodeSuccess {
				t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
			}
		}
	})
}

func TestForwardReusesConnections(t *testing.T) {
	up := startUpstream(t, answerA("192.0.2.99", 60))
	ts := startServer(t, Config{Upstreams: up.Addrs(), CacheDisabled: true}, testTable())
	for i := range 5 {
		ts.query(t, "udp", fmt.Sprintf("n%d.example.net.", i), dns.TypeA, 0)
	}
	u := ts.fwd.ups[0]
	u.mu.Lock()
	sent := u.sock.sent
	u.mu.Unlock()
	if sent != 5 {
		t.Errorf("the current upstream socket carried %d of 5 queries", sent)
	}
}

func TestCache(t *testing.T) {
	t.Run("positive answers live for their TTL", func(t *testing.T) {
		up := startUpstream(t, answerA("192.0.2.99", 60))
		ts := startServer(t, Config{Upstreams: up.Addrs()}, testTable())
		ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		ts.advance(20 * time.Second)
		for _, netw := range []string{"udp", "tcp"} {
			r := ts.query(t, netw, "EXAMPLE.net.", dns.TypeA, 0)
			if up.hits() != 1 {
				t.Fatalf("%s: upstream asked %d times, want 1 (cached)", netw, up.hits())
			}
			if ttl := r.Answer[0].Header().Ttl; ttl != 40 {
				t.Errorf("%s: cached TTL %d, want 40 (60 - 20 s)", netw, ttl)
			}
			if r.Question[0].Name != "EXAMPLE.net." || r.Answer[0].Header().Name != "EXAMPLE.net." {
				t.Errorf("%s: client's case not kept: %v", netw, r)
			}
		}
		if r := ts.query(t, "udp", "example.net.", dns.TypeA, 1232); r.IsEdns0() == nil || len(r.Answer) != 1 {
			t.Errorf("EDNS query from the cache: %v", r)
		}
		ts.advance(41 * time.Second)
		ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		if up.hits() != 2 {
			t.Errorf("after expiry: upstream asked %d times, want 2", up.hits())
		}
		if counterValue(ts.m.cacheHits) != 3 || counterValue(ts.m.cacheMisses) != 2 {
			t.Errorf("hits %v misses %v, want 3 and 2", counterValue(ts.m.cacheHits), counterValue(ts.m.cacheMisses))
		}
	})
	t.Run("NXDOMAIN lives for the SOA minimum", func(t *testing.T) {
		up := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, _ bool) {
			m := new(dns.Msg)
			m.SetRcode(r, dns.RcodeNameError)
			m.Ns = []dns.RR{&dns.SOA{
				Hdr: dns.RR_Header{Name: "net.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 900},
				Ns:  "a.net.", Mbox: "h.net.", Serial: 1, Refresh: 1, Retry: 1, Expire: 1, Minttl: 10,
			}}
			_ = w.WriteMsg(m)
		})
		ts := startServer(t, Config{Upstreams: up.Addrs()}, testTable())
		for range 3 {
			if r := ts.query(t, "udp", "nx.example.net.", dns.TypeA, 0); r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 {
				t.Fatalf("got %v", r)
			}
		}
		if up.hits() != 1 {
			t.Errorf("upstream asked %d times, want 1", up.hits())
		}
		ts.advance(11 * time.Second)
		ts.query(t, "udp", "nx.example.net.", dns.TypeA, 0)
		if up.hits() != 2 {
			t.Errorf("after the SOA minimum: upstream asked %d times, want 2", up.hits())
		}
	})
	t.Run("NXDOMAIN without SOA is not cached", func(t *testing.T) {
		up := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, _ bool) {
			m := new(dns.Msg)
			m.SetRcode(r, dns.RcodeNameError)
			_ = w.WriteMsg(m)
		})
		ts := startServer(t, Config{Upstreams: up.Addrs()}, testTable())
		ts.query(t, "udp", "nx.example.net.", dns.TypeA, 0)
		ts.query(t, "udp", "nx.example.net.", dns.TypeA, 0)
		if up.hits() != 2 {
			t.Errorf("upstream asked %d times, want 2", up.hits())
		}
	})
	t.Run("DNS_CACHE=false", func(t *testing.T) {
		up := startUpstream(t, answerA("192.0.2.99", 60))
		ts := startServer(t, Config{Upstreams: up.Addrs(), CacheDisabled: true}, testTable())
		ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		if up.hits() != 2 {
			t.Errorf("upstream asked %d times, want 2", up.hits())
		}
	})
	t.Run("bounded", func(t *testing.T) {
		up := startUpstream(t, answerA("192.0.2.99", 60))
		ts := startServer(t, Config{Upstreams: up.Addrs(), CacheSize: 3}, testTable())
		for i := range 5 {
			ts.query(t, "udp", fmt.Sprintf("n%d.example.net.", i), dns.TypeA, 0)
		}
		if n := ts.cache.len(); n != 3 {
			t.Errorf("%d entries, want 3", n)
		}
		ts.query(t, "udp", "n0.example.net.", dns.TypeA, 0) // evicted first
		if up.hits() != 6 {
			t.Errorf("upstream asked %d times, want 6", up.hits())
		}
	})
}

func TestServeStale(t *testing.T) {
	for _, disabled := range []bool{false, true} {
		t.Run(fmt.Sprintf("disabled=%v", disabled), func(t *testing.T) {
			up := startUpstream(t, answerA("192.0.2.99", 60))
			ts := startServer(t, Config{Upstreams: up.Addrs(), ServeStaleDisabled: disabled, ForwardTimeout: 100 * time.Millisecond}, testTable())
			ts.query(t, "udp", "example.net.", dns.TypeA, 0)
			ts.advance(2 * time.Minute)
			up.set(func(w dns.ResponseWriter, r *dns.Msg, _ bool) {}) // every upstream fails now
			for _, netw := range []string{"udp", "tcp"} {
				r := ts.query(t, netw, "example.net.", dns.TypeA, 0)
				if disabled {
					if r.Rcode != dns.RcodeServerFailure {
						t.Errorf("%s: rcode %s, want SERVFAIL", netw, dns.RcodeToString[r.Rcode])
					}
					continue
				}
				if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 || r.Answer[0].Header().Ttl != staleTTL {
					t.Errorf("%s: want the stale answer with TTL 30, got %v", netw, r)
				}
			}
			ts.advance(25 * time.Hour) // past the stale window
			if r := ts.query(t, "udp", "example.net.", dns.TypeA, 0); r.Rcode != dns.RcodeServerFailure {
				t.Errorf("past the stale window: rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
			}
		})
	}
}

// refusing is a UDP port on loopback where nothing listens: the kernel
// answers queries to it with ICMP port unreachable.
func refusing(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	pc.Close()
	return ap
}

func TestForwardRefusedFailsFast(t *testing.T) {
	// A resolver whose port is closed answers with ICMP port unreachable:
	// the query fails with that error instead of waiting out the timeout
	// (which is long here so that waiting it out fails the test).
	u := newUpstream(refusing(t), 10*time.Second)
	defer u.close()
	msg := packQuery(t, "example.net.", dns.TypeA, 0)
	for i := range 3 { // the first query and those on the replaced socket
		_, err := u.exchangeUDP(t.Context(), append([]byte(nil), msg...))
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("query %d: err %v, want connection refused", i, err)
		}
	}

	// Sequential forwarding then reaches the working resolver at once.
	good := startUpstream(t, answerA("192.0.2.99", 60))
	ts := startServer(t, Config{Upstreams: []netip.AddrPort{refusing(t), good.addr}, ForwardTimeout: 30 * time.Second, CacheDisabled: true}, testTable())
	for range 4 { // random order: both orders happen
		r := ts.query(t, "udp", "example.net.", dns.TypeA, 0)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("rcode %s answers %v", dns.RcodeToString[r.Rcode], r.Answer)
		}
	}
}

func TestForwardTCPAnswerWithoutQuestion(t *testing.T) {
	// The upstream truncates over UDP and answers over TCP with records but
	// no question section: the answer cannot be matched to the query, so it
	// is not used (nor cached); the client gets the truncated UDP answer
	// with TC, and the proxy keeps running.
	up := startUpstream(t, func(w dns.ResponseWriter, r *dns.Msg, tcp bool) {
		if !tcp {
			bigAnswer(34, true)(w, r, tcp)
			return
		}
		m := new(dns.Msg)
		m.SetReply(r)
		m.Question = nil
		m.Answer = []dns.RR{&dns.A{
			Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
			A:   net.IPv4(192, 0, 2, 1),
		}}
		_ = w.WriteMsg(m)
	})
	ts := startServer(t, Config{Upstreams: up.Addrs()}, testTable())
	for range 2 {
		r := ts.query(t, "udp", "big.example.net.", dns.TypeA, 0)
		if r.Rcode != dns.RcodeSuccess || !r.Truncated || len(r.Answer) != 0 {
			t.Fatalf("rcode %s TC %v answers %v, want NOERROR with TC and no records", dns.RcodeToString[r.Rcode], r.Truncated, r.Answer)
		}
	}
	if up.tcpHits.Load() != 2 {
		t.Errorf("%d TCP queries upstream, want 2 (nothing cached)", up.tcpHits.Load())
	}
}
