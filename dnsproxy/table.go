package dnsproxy

import (
	"encoding/binary"
	"net/netip"
	"sort"
	"strings"

	"github.com/miekg/dns"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// registryKubernetes is the NameInfo.Registry of cluster services, the only
// ones that get short names.
const registryKubernetes = "Kubernetes"

// maxAddrsPerHost caps the records of one host so that the largest table
// answer fits a 64 KiB message with room to spare.
const maxAddrsPerHost = 2048

// hostAddrs are the addresses of one NameTable entry, packed as RDATA, shared
// by every name that entry answers for.
type hostAddrs struct {
	v4 [][4]byte
	v6 [][16]byte
}

// nameEntry is what one (lower-case, wire-form) name answers.
type nameEntry struct {
	addrs *hostAddrs
	// viaSearch marks a search-domain expansion (<host>.<search[0]>): the
	// answer is a CNAME from the question to the question without the
	// search suffix, then that name's addresses.
	viaSearch bool
	// rank orders competing claims to one name; lower wins.
	rank int
}

// lookupTable is an immutable view of one name table, built off the hot path
// and swapped in atomically.
type lookupTable struct {
	names map[string]*nameEntry
	// wildcards tells whether any name starts with "*.", so that misses
	// skip the wildcard walk in the common case.
	wildcards bool
	// searchLen is the wire length of the first search domain without its
	// root byte (0 when resolv.conf has no search list).
	searchLen int
	// source is the table as received, for /debug/ndsz.
	source *nds.NameTable
}

// Ranks: a name the control plane sent beats a generated alias, which beats
// a search-domain expansion; Kubernetes entries beat other registries.
const (
	rankExact = iota * 2
	rankAlias
	rankSearch
)

// tableBuilder expands a NameTable as the reference agent does.
type tableBuilder struct {
	namespace string
	// domain is the proxy domain without the namespace label, e.g.
	// "svc.cluster.local"; domainFirst is its first label ("svc").
	domain, domainFirst string
	// search is the first resolv.conf search domain, lower case, no dots
	// at either end ("" when none).
	search string
}

func newTableBuilder(namespace, proxyDomain string, search []string) *tableBuilder {
	b := &tableBuilder{namespace: namespace}
	parts := strings.Split(strings.Trim(proxyDomain, "."), ".")
	if len(parts) > 0 && parts[0] == namespace {
		parts = parts[1:]
	}
	if len(parts) > 0 && parts[0] != "" {
		b.domain = strings.Join(parts, ".")
		b.domainFirst = parts[0]
	}
	if len(search) > 0 {
		b.search = strings.ToLower(strings.Trim(search[0], "."))
	}
	return b
}

// altHosts lists the names (dotless at the end) an entry answers for, each
// with its rank.
func (b *tableBuilder) altHosts(host string, ni *nds.NameInfo, emit func(name string, rank int)) {
	host = strings.TrimSuffix(host, ".")
	kube := 0
	if ni.Registry != registryKubernetes {
		kube = 1
	}
	emit(host, rankExact+kube)
	if ni.Registry != registryKubernetes {
		return
	}
	// Short names only inside our own cluster domain: name.namespace across
	// clusters of different domains would collide.
	if b.domain == "" || !strings.HasSuffix(host, b.domain) {
		return
	}
	emit(ni.Shortname+"."+ni.Namespace, rankAlias)
	if ni.Namespace == b.namespace {
		emit(ni.Shortname, rankAlias)
	}
	emit(ni.Shortname+"."+ni.Namespace+"."+b.domainFirst, rankAlias)
	for _, h := range ni.AltHosts {
		emit(strings.TrimSuffix(h, "."), rankAlias)
	}
}

// build turns a NameTable into a lookup table. Entries without a parseable
// IP are skipped, as the reference does.
func (b *tableBuilder) build(nt *nds.NameTable) *lookupTable {
	t := &lookupTable{names: make(map[string]*nameEntry), source: nt}
	if b.search != "" {
		t.searchLen = len(wireName(b.search)) - 1
	}
	if nt == nil {
		return t
	}
	hosts := make([]string, 0, len(nt.Table))
	for h := range nt.Table {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts) // deterministic winner among equal ranks
	put := func(name string, e *nameEntry) {
		w := wireName(strings.ToLower(name))
		if w == nil {
			return
		}
		if old, ok := t.names[string(w)]; ok && old.rank <= e.rank {
			return
		}
		t.names[string(w)] = e
		if len(w) > 2 && w[0] == 1 && w[1] == '*' {
			t.wildcards = true
		}
	}
	for _, h := range hosts {
		ni := nt.Table[h]
		if ni == nil {
			continue
		}
		addrs := parseAddrs(ni.IPs)
		if addrs == nil {
			continue
		}
		b.altHosts(h, ni, func(name string, rank int) {
			put(name, &nameEntry{addrs: addrs, rank: rank})
			if b.search == "" {
				return
			}
			lname := strings.ToLower(name)
			if lname == b.search || strings.HasSuffix(lname, "."+b.search) {
				return
			}
			put(name+"."+b.search, &nameEntry{addrs: addrs, viaSearch: true, rank: rankSearch})
		})
	}
	return t
}

// parseAddrs splits IPs into packed v4 and v6 RDATA; nil when none parse.
func parseAddrs(ips []string) *hostAddrs {
	a := &hostAddrs{}
	for _, s := range ips {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() && len(a.v4) < maxAddrsPerHost {
			a.v4 = append(a.v4, ip.As4())
		} else if ip.Is6() && len(a.v6) < maxAddrsPerHost {
			a.v6 = append(a.v6, ip.As16())
		}
	}
	if len(a.v4) == 0 && len(a.v6) == 0 {
		return nil
	}
	return a
}

// wireName packs a dotted name (no trailing dot needed) into wire form; nil
// if it is not a valid name.
func wireName(name string) []byte {
	fq := dns.Fqdn(name)
	buf := make([]byte, 256)
	n, err := dns.PackDomainName(fq, buf, 0, nil, false)
	if err != nil {
		return nil
	}
	return buf[:n:n]
}

// lookup finds the entry for a lower-case wire name: an exact match, else
// the most specific wildcard ("*.b.c." before "*.c."). scratch must hold
// 257 bytes. It does not allocate.
func (t *lookupTable) lookup(name, scratch []byte) *nameEntry {
	if e := t.names[string(name)]; e != nil {
		return e
	}
	if !t.wildcards {
		return nil
	}
	// Walk label boundaries: for a.b.c. try *.b.c. then *.c.
	off := 0
	for {
		l := int(name[off])
		if l == 0 {
			return nil
		}
		off += 1 + l
		if name[off] == 0 {
			return nil // "*." alone is not a wildcard for everything
		}
		scratch[0], scratch[1] = 1, '*'
		n := 2 + copy(scratch[2:], name[off:])
		if e := t.names[string(scratch[:n])]; e != nil {
			return e
		}
	}
}

// Record sizes with a compressed owner name.
const (
	rrFixed   = 2 + 2 + 2 + 4 + 2 // owner pointer, type, class, ttl, rdlength
	rrALen    = rrFixed + 4
	rrAAAALen = rrFixed + 16
)

// writeAnswer writes the complete response for a table hit into out and
// returns its length. q must be an A or AAAA question of class IN; rot
// rotates the address records (round robin). The response never exceeds
// limit: address records that do not fit are left out and TC is set.
func writeAnswer(out, pkt []byte, q *query, e *nameEntry, searchLen int, rot uint32, limit int) int {
	off := headerLen + copy(out[headerLen:], pkt[headerLen:q.qend])
	var an uint16
	owner := uint16(0xC000 | headerLen)
	if e.viaSearch {
		// CNAME <question> -> <question minus the search suffix>.
		target := q.name[:len(q.name)-1-searchLen]
		binary.BigEndian.PutUint16(out[off:], owner)
		binary.BigEndian.PutUint16(out[off+2:], typeCNAME)
		binary.BigEndian.PutUint16(out[off+4:], classIN)
		binary.BigEndian.PutUint32(out[off+6:], ttlSeconds)
		binary.BigEndian.PutUint16(out[off+10:], uint16(len(target)+1))
		off += rrFixed
		owner = uint16(0xC000 | off)
		off += copy(out[off:], target)
		out[off] = 0
		off++
		an++
	}
	reserve := 0
	if q.edns {
		reserve = optLen
	}
	var flags uint16 = flagAA
	if off+reserve > limit {
		// Only with names near the 255-byte limit and no EDNS: the CNAME
		// alone does not fit. Send the question with TC; TCP will do.
		off, an = q.qend, 0
		flags |= flagTC
		if q.edns {
			off = writeOPT(out, off, q, rcodeSuccess)
		}
		writeHeader(out, q, flags, rcodeSuccess, 0, uint16(reserve/optLen))
		return off
	}
	var n, size int
	if q.qtype == typeA {
		n, size = len(e.addrs.v4), rrALen
	} else {
		n, size = len(e.addrs.v6), rrAAAALen
	}
	if fit := (limit - off - reserve) / size; fit < n {
		if fit < 0 {
			fit = 0
		}
		n = fit
		flags |= flagTC
	}
	total := n
	if q.qtype == typeA {
		total = len(e.addrs.v4)
	} else {
		total = len(e.addrs.v6)
	}
	for i := 0; i < n; i++ {
		j := (int(rot%uint32(total)) + i) % total
		binary.BigEndian.PutUint16(out[off:], owner)
		binary.BigEndian.PutUint16(out[off+4:], classIN)
		binary.BigEndian.PutUint32(out[off+6:], ttlSeconds)
		if q.qtype == typeA {
			binary.BigEndian.PutUint16(out[off+2:], typeA)
			binary.BigEndian.PutUint16(out[off+10:], 4)
			copy(out[off+rrFixed:], e.addrs.v4[j][:])
		} else {
			binary.BigEndian.PutUint16(out[off+2:], typeAAAA)
			binary.BigEndian.PutUint16(out[off+10:], 16)
			copy(out[off+rrFixed:], e.addrs.v6[j][:])
		}
		off += size
		an++
	}
	var ar uint16
	if q.edns {
		ar = 1
		off = writeOPT(out, off, q, rcodeSuccess)
	}
	writeHeader(out, q, flags, rcodeSuccess, an, ar)
	return off
}

// nameTableForDebug returns the table as /debug/ndsz shows it: the source
// entries plus one entry per generated name (with a trailing dot, as the
// reference prints them) that the source does not already hold.
func (b *tableBuilder) nameTableForDebug(src *nds.NameTable) *nds.NameTable {
	out := &nds.NameTable{Table: make(map[string]*nds.NameInfo, len(src.Table))}
	for h, ni := range src.Table {
		out.Table[h] = ni
	}
	for h, ni := range src.Table {
		if ni == nil || parseAddrs(ni.IPs) == nil {
			continue
		}
		b.altHosts(h, ni, func(name string, _ int) {
			if name == strings.TrimSuffix(h, ".") {
				return
			}
			if _, ok := out.Table[name]; ok {
				return
			}
			if _, ok := out.Table[name+"."]; ok {
				return
			}
			out.Table[name+"."] = &nds.NameInfo{IPs: ni.IPs, Registry: ni.Registry}
		})
	}
	return out
}
