package dnsproxy

import (
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
)

func packQuery(t testing.TB, name string, qtype uint16, edns uint16) []byte {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.Id = 0x1234
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// malformed are requests the proxy must answer with an error code or drop.
// want -1 means no answer.
var malformed = []struct {
	name string
	pkt  func(t testing.TB) []byte
	want int
}{
	{"shorter than a header", func(testing.TB) []byte { return []byte{0x12, 0x34, 0x01} }, -1},
	{"a response", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		b[2] |= 0x80
		return b
	}, -1},
	{"zero questions", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		binary.BigEndian.PutUint16(b[4:], 0)
		return b[:headerLen]
	}, dns.RcodeFormatError},
	{"two questions", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		binary.BigEndian.PutUint16(b[4:], 2)
		return b
	}, dns.RcodeFormatError},
	{"label runs past the end", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		b[headerLen] = 60
		return b
	}, dns.RcodeFormatError},
	{"truncated question", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		return b[:len(b)-3]
	}, dns.RcodeFormatError},
	{"compression pointer loop in the question", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		b[headerLen], b[headerLen+1] = 0xC0, headerLen
		return b
	}, dns.RcodeFormatError},
	{"name longer than 255", func(t testing.TB) []byte {
		b := make([]byte, headerLen)
		binary.BigEndian.PutUint16(b[4:], 1)
		for range 5 {
			b = append(b, 63)
			b = append(b, make([]byte, 63)...)
		}
		return append(b, 0, 0, 1, 0, 1)
	}, dns.RcodeFormatError},
	{"bad EDNS rdlength", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 1232)
		b[len(b)-1] = 200
		return b
	}, dns.RcodeFormatError},
	{"opcode STATUS", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 0)
		b[2] |= 2 << 3
		return b
	}, dns.RcodeNotImplemented},
	{"EDNS version 1", func(t testing.TB) []byte {
		b := packQuery(t, "example.net.", dns.TypeA, 1232)
		b[len(b)-5] = 1
		return b
	}, dns.RcodeBadVers},
}

func TestMalformedRequests(t *testing.T) {
	ts := startServer(t, Config{}, testTable())
	conn, err := net.Dial("udp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, tc := range malformed {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := conn.Write(tc.pkt(t)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4096)
			_ = conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			n, err := conn.Read(buf)
			if tc.want < 0 {
				if err == nil {
					t.Fatalf("answered (%d bytes), want silence", n)
				}
				return
			}
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			m := new(dns.Msg)
			if err := m.Unpack(buf[:n]); err != nil {
				t.Fatalf("unpack answer: %v", err)
			}
			if m.Rcode != tc.want || m.Id != 0x1234 && tc.want != dns.RcodeFormatError {
				t.Errorf("rcode %s id %x, want %s", dns.RcodeToString[m.Rcode], m.Id, dns.RcodeToString[tc.want])
			}
		})
	}
	// Still serving.
	if r := ts.query(t, "udp", "productpage.", dns.TypeA, 0); len(r.Answer) != 1 {
		t.Fatalf("after malformed packets: %v", r)
	}
}

func TestMalformedTCP(t *testing.T) {
	ts := startServer(t, Config{}, testTable())
	tests := []struct {
		name string
		send []byte
	}{
		{"length prefix 65535 then a few bytes", []byte{0xFF, 0xFF, 1, 2, 3}},
		{"length prefix below a header", []byte{0, 3, 1, 2, 3}},
		{"half a prefix", []byte{0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", ts.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			// The server must not answer garbage; it either waits for the
			// rest or closes. Another client is served meanwhile.
			if r := ts.query(t, "tcp", "productpage.", dns.TypeA, 0); len(r.Answer) != 1 {
				t.Fatalf("%v", r)
			}
		})
	}
	// Pipelined queries on one connection all get answers.
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var batch []byte
	for _, n := range []string{"productpage.", "example.invalid.", "reviews.other."} {
		q := packQuery(t, n, dns.TypeA, 0)
		batch = append(batch, byte(len(q)>>8), byte(len(q)))
		batch = append(batch, q...)
	}
	if _, err := c.Write(batch); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for i := range 3 {
		var l [2]byte
		if _, err := readFull(c, l[:]); err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		b := make([]byte, int(l[0])<<8|int(l[1]))
		if _, err := readFull(c, b); err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
	}
}

// newBareServer is a Server that does not listen, for driving the packet
// path directly.
func newBareServer(tb testing.TB, cache bool) *Server {
	tb.Helper()
	s, err := New(Config{ListenAddr: "127.0.0.1:0", Namespace: "ns", Domain: "ns.svc.cluster.local",
		Search: testSearch, Upstreams: nil, ResolvConf: writeResolvConfTB(tb), CacheDisabled: !cache}, zap.NewNop())
	if err != nil {
		tb.Fatal(err)
	}
	s.UpdateNameTable(testTable())
	return s
}

func writeResolvConfTB(tb testing.TB) string {
	p := filepath.Join(tb.TempDir(), "resolv.conf")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		tb.Fatal(err)
	}
	return p
}

func TestTableHitDoesNotAllocate(t *testing.T) {
	s := newBareServer(t, true)
	// Warm a cache entry by hand.
	up := new(dns.Msg)
	up.SetQuestion("cached.example.net.", dns.TypeA)
	up.Response = true
	up.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "cached.example.net.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.IPv4(192, 0, 2, 7)}}
	w := newWorker(s)
	var q query
	var nb [256]byte
	if err := parseQuery(packQuery(t, "cached.example.net.", dns.TypeA, 0), &q, nb[:]); err != nil {
		t.Fatal(err)
	}
	s.cache.put(cacheKey(make([]byte, 264), &q), up, s.now())

	for _, tc := range []struct {
		name string
		pkt  []byte
	}{
		{"A", packQuery(t, "productpage.ns.svc.cluster.local.", dns.TypeA, 0)},
		{"AAAA NODATA with EDNS", packQuery(t, "productpage.", dns.TypeAAAA, 1232)},
		{"search CNAME", packQuery(t, "api.example.com.ns.svc.cluster.local.", dns.TypeA, 0)},
		{"wildcard", packQuery(t, "www.example.com.", dns.TypeA, 0)},
		{"cache hit", packQuery(t, "cached.example.net.", dns.TypeA, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			allocs := testing.AllocsPerRun(100, func() {
				if n, slow := w.handle(tc.pkt, false); n == 0 || slow {
					t.Fatalf("not answered inline: n=%d slow=%v", n, slow)
				}
			})
			if allocs != 0 {
				t.Errorf("%v allocations per query, want 0", allocs)
			}
		})
	}
}

// FuzzPacket feeds arbitrary bytes through the hot path and, for queries
// that need it, the slow path's parsing. Nothing may panic, and answers
// must be valid DNS messages with the request's ID.
func FuzzPacket(f *testing.F) {
	for _, n := range []string{"productpage.", "api.example.com.ns.svc.cluster.local.", "www.example.com.", "example.net."} {
		f.Add(packQuery(f, n, dns.TypeA, 0))
		f.Add(packQuery(f, n, dns.TypeAAAA, 4096))
	}
	for _, tc := range malformed {
		f.Add(tc.pkt(f))
	}
	s := newBareServer(f, true)
	s.cfg.RespondBeforeSync = false
	f.Fuzz(func(t *testing.T, pkt []byte) {
		w := newWorker(s)
		for _, tcp := range []bool{false, true} {
			n, slow := w.handle(pkt, tcp)
			if slow || n == 0 {
				continue
			}
			if !tcp && n > max(minUDPSize, w.q.limit(false)) {
				t.Fatalf("UDP answer of %d bytes over the limit %d", n, w.q.limit(false))
			}
			m := new(dns.Msg)
			if err := m.Unpack(w.out[:n]); err != nil {
				t.Fatalf("answer does not parse: %v\n% x", err, w.out[:n])
			}
			if m.Id != binary.BigEndian.Uint16(pkt) {
				t.Fatalf("answer ID %x", m.Id)
			}
		}
	})
}
