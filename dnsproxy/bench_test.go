package dnsproxy

import (
	"net"
	"testing"

	"github.com/miekg/dns"
)

// BenchmarkHandle measures the packet path without sockets: parse, look up,
// write the answer. Table and cache hits must report 0 allocs/op.
func BenchmarkHandle(b *testing.B) {
	s := newBareServer(b, true)
	up := new(dns.Msg)
	up.SetQuestion("cached.example.net.", dns.TypeA)
	up.Response = true
	up.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "cached.example.net.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.IPv4(192, 0, 2, 7)}}
	var q query
	var nb [256]byte
	if err := parseQuery(packQuery(b, "cached.example.net.", dns.TypeA, 0), &q, nb[:]); err != nil {
		b.Fatal(err)
	}
	s.cache.put(cacheKey(make([]byte, 264), &q), up, s.now())

	for _, bc := range []struct {
		name string
		pkt  []byte
	}{
		{"table-A", packQuery(b, "productpage.ns.svc.cluster.local.", dns.TypeA, 0)},
		{"table-short-EDNS", packQuery(b, "productpage.", dns.TypeA, 1232)},
		{"table-search-CNAME", packQuery(b, "api.example.com.ns.svc.cluster.local.", dns.TypeA, 0)},
		{"table-wildcard", packQuery(b, "a.b.deep.example.com.", dns.TypeA, 0)},
		{"table-4-addrs", packQuery(b, "lb.example.org.", dns.TypeA, 0)},
		{"cache-hit", packQuery(b, "cached.example.net.", dns.TypeA, 0)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			w := newWorker(s)
			b.ReportAllocs()
			for b.Loop() {
				if n, slow := w.handle(bc.pkt, false); n == 0 || slow {
					b.Fatal("not answered inline")
				}
			}
		})
	}
}

// BenchmarkUDPRoundTrip measures one query and answer over real loopback
// UDP sockets, client included.
func BenchmarkUDPRoundTrip(b *testing.B) {
	s := newBareServer(b, true)
	done := make(chan error, 1)
	ctx, cancel := contextWithCancel()
	go func() { done <- s.Run(ctx) }()
	<-s.Listening()
	defer func() { cancel(); <-done }()
	c, err := net.Dial("udp", s.Addrs()[0].String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pkt := packQuery(b, "productpage.ns.svc.cluster.local.", dns.TypeA, 0)
	buf := make([]byte, 512)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(pkt); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
}
