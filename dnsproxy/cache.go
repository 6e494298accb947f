package dnsproxy

import (
	"container/list"
	"encoding/binary"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// staleTTL is the TTL of answers served stale (RFC 8767 section 4).
const staleTTL = 30

// cache holds upstream answers, packed, keyed by question, with their TTL
// fields located so a hit is a copy and a few patches, with no allocation.
// Positive answers live for their smallest TTL, negative ones for the SOA
// minimum (RFC 2308); expired entries stay for staleFor to be served when
// every upstream fails (RFC 8767). Least recently used entries go first.
type cache struct {
	mu       sync.Mutex
	max      int
	maxTTL   time.Duration
	staleFor time.Duration // 0: no serve-stale
	items    map[string]*list.Element
	lru      list.List
}

// cacheEntry is immutable once stored.
type cacheEntry struct {
	key string
	// msg is the packed response with ID 0, a lower-case question, no OPT
	// record and no TC bit.
	msg     []byte
	qend    int
	ttlOffs []int
	ttls    []uint32
	stored  time.Time
	expires time.Time
}

func newCache(size int, maxTTL, staleFor time.Duration) *cache {
	return &cache{max: size, maxTTL: maxTTL, staleFor: staleFor, items: make(map[string]*list.Element)}
}

// cacheKey writes the key of q into buf (at least 260 bytes) and returns it.
// DO and CD change what an upstream returns, so they are part of the key.
func cacheKey(buf []byte, q *query) []byte {
	n := copy(buf, q.name)
	binary.BigEndian.PutUint16(buf[n:], q.qtype)
	binary.BigEndian.PutUint16(buf[n+2:], q.qclass)
	var f byte
	if q.do {
		f |= 1
	}
	if q.flags&flagCD != 0 {
		f |= 2
	}
	buf[n+4] = f
	return buf[:n+5]
}

// get returns the entry for key and whether it is still fresh. Expired
// entries are returned (fresh false) while serve-stale may still use them.
func (c *cache) get(key []byte, now time.Time) (*cacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[string(key)]
	if !ok {
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if now.Before(e.expires) {
		c.lru.MoveToFront(el)
		return e, true
	}
	if now.Before(e.expires.Add(c.staleFor)) {
		return e, false
	}
	c.lru.Remove(el)
	delete(c.items, e.key)
	return nil, false
}

// ttlFor decides how long resp may be cached: 0 means not at all.
func (c *cache) ttlFor(resp *dns.Msg) time.Duration {
	if resp.Truncated {
		return 0
	}
	var ttl uint32
	switch {
	case resp.Rcode == dns.RcodeSuccess && len(resp.Answer) > 0:
		ttl = ^uint32(0)
		for _, sec := range [][]dns.RR{resp.Answer, resp.Ns, resp.Extra} {
			for _, rr := range sec {
				if rr.Header().Rrtype == dns.TypeOPT {
					continue
				}
				ttl = min(ttl, rr.Header().Ttl)
			}
		}
	case resp.Rcode == dns.RcodeSuccess || resp.Rcode == dns.RcodeNameError:
		// Negative answer: only with an SOA to bound it (RFC 2308 section 5).
		for _, rr := range resp.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				ttl = min(soa.Hdr.Ttl, soa.Minttl)
				break
			}
		}
	}
	d := time.Duration(ttl) * time.Second
	return min(d, c.maxTTL)
}

// put stores resp, the upstream answer to the question of q (name lower
// case in wire form in key). It allocates; it runs on the forwarding path.
func (c *cache) put(key []byte, resp *dns.Msg, now time.Time) {
	ttl := c.ttlFor(resp)
	if ttl <= 0 || len(resp.Question) == 0 {
		return
	}
	m := resp.Copy()
	m.Id = 0
	m.Truncated = false
	m.Question = m.Question[:1]
	m.Question[0].Name = strings.ToLower(m.Question[0].Name)
	extra := m.Extra[:0]
	for _, rr := range m.Extra {
		if rr.Header().Rrtype != dns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	m.Extra = extra
	m.Compress = true
	msg, err := m.Pack()
	if err != nil {
		return
	}
	qend, offs, ttls, err := locateTTLs(msg)
	if err != nil {
		return
	}
	e := &cacheEntry{
		key: string(key), msg: msg, qend: qend, ttlOffs: offs, ttls: ttls,
		stored: now, expires: now.Add(ttl),
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[e.key]; ok {
		el.Value = e
		c.lru.MoveToFront(el)
		return
	}
	c.items[e.key] = c.lru.PushFront(e)
	for c.lru.Len() > c.max {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.items, old.Value.(*cacheEntry).key)
	}
}

// len returns the number of entries, fresh or stale.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// serve writes the cached answer for q into out and returns its length, or
// 0 when it does not fit limit (the caller then takes the slow path, which
// truncates). stale answers get TTL 30 s.
func (e *cacheEntry) serve(out, pkt []byte, q *query, now time.Time, stale bool, limit int) int {
	n := len(e.msg)
	if q.edns {
		n += optLen
	}
	if n > limit || q.qend != e.qend {
		return 0
	}
	off := copy(out, e.msg)
	binary.BigEndian.PutUint16(out, q.id)
	flags := binary.BigEndian.Uint16(out[2:])&^(flagRD|flagCD|flagTC) | q.flags&(flagRD|flagCD)
	binary.BigEndian.PutUint16(out[2:], flags)
	copy(out[headerLen:], pkt[headerLen:q.qend]) // the client's case
	age := uint32(now.Sub(e.stored) / time.Second)
	for i, o := range e.ttlOffs {
		ttl := uint32(staleTTL)
		if !stale {
			ttl = 0
			if e.ttls[i] > age {
				ttl = e.ttls[i] - age
			}
		}
		binary.BigEndian.PutUint32(out[o:], ttl)
	}
	if q.edns {
		ar := binary.BigEndian.Uint16(out[10:])
		binary.BigEndian.PutUint16(out[10:], ar+1)
		off = writeOPT(out, off, q, rcodeSuccess)
	}
	return off
}

var errBadMsg = errors.New("dnsproxy: bad message")

// locateTTLs walks a packed message and returns the end of its question
// section and the offset and value of every record's TTL.
func locateTTLs(msg []byte) (qend int, offs []int, ttls []uint32, err error) {
	if len(msg) < headerLen {
		return 0, nil, nil, errBadMsg
	}
	qd := int(binary.BigEndian.Uint16(msg[4:]))
	rrs := int(binary.BigEndian.Uint16(msg[6:])) + int(binary.BigEndian.Uint16(msg[8:])) + int(binary.BigEndian.Uint16(msg[10:]))
	off := headerLen
	for range qd {
		if off, err = skipName(msg, off); err != nil {
			return 0, nil, nil, err
		}
		off += 4
	}
	qend = off
	for range rrs {
		if off, err = skipName(msg, off); err != nil {
			return 0, nil, nil, err
		}
		if off+10 > len(msg) {
			return 0, nil, nil, errBadMsg
		}
		offs = append(offs, off+4)
		ttls = append(ttls, binary.BigEndian.Uint32(msg[off+4:]))
		off += 10 + int(binary.BigEndian.Uint16(msg[off+8:]))
	}
	if off > len(msg) || qend > len(msg) {
		return 0, nil, nil, errBadMsg
	}
	return qend, offs, ttls, nil
}

// skipName returns the offset after the name at off.
func skipName(msg []byte, off int) (int, error) {
	for {
		if off >= len(msg) {
			return 0, errBadMsg
		}
		l := int(msg[off])
		switch {
		case l == 0:
			return off + 1, nil
		case l&0xC0 == 0xC0:
			return off + 2, nil
		case l&0xC0 != 0:
			return 0, errBadMsg
		}
		off += 1 + l
	}
}
