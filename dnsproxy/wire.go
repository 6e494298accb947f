package dnsproxy

import (
	"encoding/binary"
	"errors"
)

// This file is the allocation-free edge of the hot path: it reads just
// enough of a request (header, the one question, an EDNS OPT record) and
// writes responses byte by byte. Everything richer goes through miekg/dns on
// the slow path (forwarding, cache fill).

const (
	headerLen = 12

	// minUDPSize is what a client without EDNS can take (RFC 1035).
	minUDPSize = 512
	// maxMsgSize is the most a DNS message can be (TCP length prefix).
	maxMsgSize = 65535
	// ourUDPSize is the EDNS payload size we advertise to clients and ask
	// upstreams for: the DNS flag day 2020 value, safe from fragmentation.
	ourUDPSize = 1232
	// ttlSeconds is the TTL of name-table answers, as the reference (not
	// configurable there either).
	ttlSeconds = 30

	typeA     = 1
	typeCNAME = 5
	typeAAAA  = 28
	typeOPT   = 41
	classIN   = 1

	flagQR = 1 << 15
	flagAA = 1 << 10
	flagTC = 1 << 9
	flagRD = 1 << 8
	flagRA = 1 << 7
	flagCD = 1 << 4

	rcodeSuccess  = 0
	rcodeFormErr  = 1
	rcodeServFail = 2
	rcodeNXDomain = 3
	rcodeNotImp   = 4
	rcodeRefused  = 5
)

// errDrop marks a packet that gets no answer at all: too short to carry an
// ID, or a response (answering responses invites loops).
var errDrop = errors.New("dnsproxy: packet dropped")

// parseError carries the rcode for a request we answer with an error.
type parseError struct{ rcode int }

func (e *parseError) Error() string { return "dnsproxy: malformed request" }

var (
	errFormErr = &parseError{rcodeFormErr}
	errNotImp  = &parseError{rcodeNotImp}
	errBadVers = &parseError{16} // extended rcode BADVERS (RFC 6891)
)

// query is the parsed view of a request. It points into the packet and a
// caller-owned name buffer; it holds no heap memory of its own.
type query struct {
	id    uint16
	flags uint16
	// qend is the offset just past the question section; pkt[12:qend] is
	// the question exactly as the client sent it (case included).
	qend int
	// name is the question name in wire form, lower-cased (ASCII only).
	name   []byte
	qtype  uint16
	qclass uint16

	edns     bool
	ednsSize uint16
	do       bool
}

// limit is the largest response the client can take: its EDNS size (at
// least 512) over UDP, 65535 over TCP.
func (q *query) limit(tcp bool) int {
	if tcp {
		return maxMsgSize
	}
	if q.edns && q.ednsSize > minUDPSize {
		return int(q.ednsSize)
	}
	return minUDPSize
}

// parseQuery fills q from pkt. name must have room for 255 bytes; q.name
// aliases it. On error, q.id and q.flags are valid unless err is errDrop.
func parseQuery(pkt []byte, q *query, name []byte) error {
	if len(pkt) < headerLen {
		return errDrop
	}
	q.id = binary.BigEndian.Uint16(pkt)
	q.flags = binary.BigEndian.Uint16(pkt[2:])
	q.edns, q.ednsSize, q.do = false, 0, false
	q.qend = 0
	if q.flags&flagQR != 0 {
		return errDrop
	}
	if (q.flags>>11)&0xF != 0 { // opcode other than QUERY
		return errNotImp
	}
	qd := binary.BigEndian.Uint16(pkt[4:])
	an := binary.BigEndian.Uint16(pkt[6:])
	ns := binary.BigEndian.Uint16(pkt[8:])
	ar := binary.BigEndian.Uint16(pkt[10:])
	if qd != 1 {
		return errFormErr
	}
	off := headerLen
	n := 0
	for {
		if off >= len(pkt) {
			return errFormErr
		}
		l := int(pkt[off])
		if l == 0 {
			off++
			break
		}
		// Compression pointers and extended labels have no place in a
		// question: the only earlier bytes are the header.
		if l&0xC0 != 0 || off+1+l > len(pkt) || n+1+l+1 > 255 {
			return errFormErr
		}
		name[n] = byte(l)
		for i := 0; i < l; i++ {
			c := pkt[off+1+i]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			name[n+1+i] = c
		}
		n += 1 + l
		off += 1 + l
	}
	name[n] = 0
	q.name = name[:n+1]
	if off+4 > len(pkt) {
		return errFormErr
	}
	q.qtype = binary.BigEndian.Uint16(pkt[off:])
	q.qclass = binary.BigEndian.Uint16(pkt[off+2:])
	off += 4
	q.qend = off
	// EDNS: only the plain case of a query with an OPT record first in the
	// additional section; anything else (TSIG, answers in a query) is
	// ignored, as most servers do.
	if an == 0 && ns == 0 && ar > 0 {
		if off+11 > len(pkt) {
			return errFormErr
		}
		if pkt[off] == 0 && binary.BigEndian.Uint16(pkt[off+1:]) == typeOPT {
			rdlen := int(binary.BigEndian.Uint16(pkt[off+9:]))
			if off+11+rdlen > len(pkt) {
				return errFormErr
			}
			q.edns = true
			q.ednsSize = binary.BigEndian.Uint16(pkt[off+3:])
			version := pkt[off+6]
			q.do = pkt[off+7]&0x80 != 0
			if version != 0 {
				return errBadVers
			}
		}
	}
	return nil
}

// writeHeader writes a response header for q into out[:12].
func writeHeader(out []byte, q *query, flags uint16, rcode int, an, ar uint16) {
	binary.BigEndian.PutUint16(out, q.id)
	f := flagQR | flagRA | flags | q.flags&(flagRD|flagCD) | uint16(rcode&0xF)
	binary.BigEndian.PutUint16(out[2:], f)
	binary.BigEndian.PutUint16(out[4:], 1)
	binary.BigEndian.PutUint16(out[6:], an)
	binary.BigEndian.PutUint16(out[8:], 0)
	binary.BigEndian.PutUint16(out[10:], ar)
}

// optLen is the size of the OPT record we add when the client used EDNS.
const optLen = 11

// writeOPT appends our OPT record (RFC 6891) at out[off:] and returns the
// new offset.
func writeOPT(out []byte, off int, q *query, rcode int) int {
	out[off] = 0
	binary.BigEndian.PutUint16(out[off+1:], typeOPT)
	binary.BigEndian.PutUint16(out[off+3:], ourUDPSize)
	out[off+5] = byte(rcode >> 4) // extended rcode
	out[off+6] = 0                // version
	var do byte
	if q.do {
		do = 0x80
	}
	out[off+7] = do
	out[off+8] = 0
	binary.BigEndian.PutUint16(out[off+9:], 0)
	return off + optLen
}

// errorResponse writes a header-and-question response with rcode into out
// (which must hold len(pkt)+optLen bytes, or 12+optLen) and returns its
// length. Without a parsed question the response has none.
func errorResponse(out, pkt []byte, q *query, rcode int) int {
	var ar uint16
	if q.edns {
		ar = 1
	}
	off := headerLen
	if q.qend > 0 {
		off += copy(out[headerLen:], pkt[headerLen:q.qend])
	}
	writeHeader(out, q, 0, rcode, 0, ar)
	if q.qend == 0 {
		binary.BigEndian.PutUint16(out[4:], 0)
	}
	if q.edns {
		off = writeOPT(out, off, q, rcode)
	}
	return off
}
