package dnsproxy

import (
	"context"
	"errors"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
)

// worker is the scratch space of one serving goroutine: the hot path writes
// only into it, so a table or cache hit allocates nothing.
type worker struct {
	s       *Server
	q       query
	name    [256]byte
	scratch [264]byte
	// outBuf has two bytes of headroom for the TCP length prefix; out is
	// the message part.
	outBuf []byte
	out    []byte
	rot    uint32
}

func newWorker(s *Server) *worker {
	w := &worker{s: s, outBuf: make([]byte, 2+maxMsgSize+optLen)}
	w.out = w.outBuf[2:]
	return w
}

// handle answers pkt from the name table or the cache into w.out and
// returns the length (0: send nothing). slow means the query must be
// forwarded; w.q then holds its parsed form.
func (w *worker) handle(pkt []byte, tcp bool) (n int, slow bool) {
	s := w.s
	s.m.requests.Inc()
	q := &w.q
	if err := parseQuery(pkt, q, w.name[:]); err != nil {
		var pe *parseError
		if !errors.As(err, &pe) {
			s.m.count(0, resultDropped)
			return 0, false
		}
		s.m.count(q.qtype, resultFormerr)
		return errorResponse(w.out, pkt, q, pe.rcode), false
	}
	t := s.table.Load()
	if t == nil {
		if s.cfg.RespondBeforeSync {
			return 0, true
		}
		s.m.count(q.qtype, resultServfail)
		return errorResponse(w.out, pkt, q, rcodeServFail), false
	}
	if (q.qtype == typeA || q.qtype == typeAAAA) && q.qclass == classIN {
		if e := t.lookup(q.name, w.scratch[:]); e != nil {
			w.rot++
			s.m.count(q.qtype, resultTable)
			return writeAnswer(w.out, pkt, q, e, t.searchLen, w.rot, q.limit(tcp)), false
		}
	}
	if s.cache != nil {
		key := cacheKey(w.scratch[:], q)
		if e, fresh := s.cache.get(key, s.now()); e != nil && fresh {
			if n := e.serve(w.out, pkt, q, s.now(), false, q.limit(tcp)); n > 0 {
				s.m.cacheHits.Inc()
				s.m.count(q.qtype, resultCache)
				return n, false
			}
		}
	}
	return 0, true
}

// resolve answers a query that needs the upstreams (or an oversize cache
// entry): it forwards, caches, falls back to a stale answer, and returns
// the packed response for the client, or nil to send nothing.
func (s *Server) resolve(ctx context.Context, pkt []byte, tcp bool) []byte {
	var q query
	var name [256]byte
	if err := parseQuery(pkt, &q, name[:]); err != nil {
		return nil // handle already parsed it; cannot happen
	}
	limit := q.limit(tcp)
	qname, _, err := dns.UnpackDomainName(pkt, headerLen)
	if err != nil {
		s.m.count(q.qtype, resultFormerr)
		return errorBytes(pkt, &q, rcodeFormErr)
	}
	question := dns.Question{Name: qname, Qtype: q.qtype, Qclass: q.qclass}

	var key []byte
	var cached *cacheEntry
	if s.cache != nil {
		key = cacheKey(make([]byte, 264), &q)
		var fresh bool
		if cached, fresh = s.cache.get(key, s.now()); cached != nil && fresh {
			// Fresh but too big for the client: truncate a copy.
			if m, err := cached.toMsg(s.now(), false); err == nil {
				s.m.cacheHits.Inc()
				s.m.count(q.qtype, resultCache)
				return s.reply(m, &q, question, limit)
			}
		}
		s.m.cacheMisses.Inc()
	}

	up := new(dns.Msg)
	up.RecursionDesired = q.flags&flagRD != 0
	up.CheckingDisabled = q.flags&flagCD != 0
	up.Question = []dns.Question{question}
	size := uint16(ourUDPSize)
	if q.edns && q.ednsSize > size {
		size = min(q.ednsSize, 4096)
	}
	up.SetEdns0(size, q.do)

	s.m.upstreamRequests.Inc()
	start := time.Now()
	resp, err := s.fwd.forward(ctx, up)
	s.m.upstreamDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		if ctx.Err() != nil {
			return nil // shutting down
		}
		s.m.upstreamFailures.Inc()
		if cached != nil && s.cache.staleFor > 0 {
			if m, err := cached.toMsg(s.now(), true); err == nil {
				s.m.cacheHits.Inc()
				s.m.count(q.qtype, resultStale)
				s.log.Debug("every upstream failed; answering stale", zap.String("name", qname), zap.Error(err))
				return s.reply(m, &q, question, limit)
			}
		}
		s.log.Debug("every upstream failed", zap.String("name", qname), zap.Error(err))
		if resp == nil {
			s.m.count(q.qtype, resultServfail)
			return errorBytes(pkt, &q, rcodeServFail)
		}
		// An upstream's own SERVFAIL or REFUSED is relayed as it is.
	}
	if s.cache != nil && err == nil {
		s.cache.put(key, resp, s.now())
	}
	s.m.count(q.qtype, resultUpstream)
	return s.reply(resp, &q, question, limit)
}

// reply shapes an upstream or cached answer for the client: its ID, its
// question (case included), our OPT record when it sent one, cut to limit
// with TC set when records had to go.
func (s *Server) reply(m *dns.Msg, q *query, question dns.Question, limit int) []byte {
	m.Id = q.id
	m.Response = true
	m.RecursionDesired = q.flags&flagRD != 0
	m.CheckingDisabled = q.flags&flagCD != 0
	m.Question = []dns.Question{question}
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != dns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	m.Extra = extra
	if m.Rcode > 0xF && !q.edns {
		m.Rcode = dns.RcodeServerFailure // an extended rcode needs EDNS
	}
	if q.edns {
		m.SetEdns0(ourUDPSize, q.do)
	}
	m.Truncate(limit)
	m.Compress = true
	out, err := m.Pack()
	if err != nil {
		s.log.Debug("pack answer", zap.Error(err))
		return errorBytes(nil, q, rcodeServFail)
	}
	return out
}

// errorBytes is errorResponse into a fresh buffer, for the slow path.
func errorBytes(pkt []byte, q *query, rcode int) []byte {
	out := make([]byte, len(pkt)+headerLen+optLen)
	if pkt == nil {
		q.qend = 0
	}
	return out[:errorResponse(out, pkt, q, rcode)]
}

// toMsg unpacks a cache entry with its TTLs aged (or set to 30 s if stale).
func (e *cacheEntry) toMsg(now time.Time, stale bool) (*dns.Msg, error) {
	m := new(dns.Msg)
	if err := m.Unpack(e.msg); err != nil {
		return nil, err
	}
	age := uint32(now.Sub(e.stored) / time.Second)
	i := 0
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			switch {
			case stale:
				h.Ttl = staleTTL
			case i < len(e.ttls) && e.ttls[i] > age:
				h.Ttl = e.ttls[i] - age
			default:
				h.Ttl = 0
			}
			i++
		}
	}
	return m, nil
}
