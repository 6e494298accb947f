package dnsproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"
)

// This file holds the pooled connections to one upstream resolver: one
// connected UDP socket shared by all queries (answers matched by ID and
// question), replaced after a number of queries so the source port keeps
// changing, and a small pool of reused TCP connections.

// udpRotateAfter is how many queries one upstream UDP socket carries before
// a fresh one (and a fresh source port) takes over.
const udpRotateAfter = 4096

// tcpIdleTimeout is how long an idle upstream TCP connection is kept; CoreDNS
// closes idle ones after 10 s.
const tcpIdleTimeout = 8 * time.Second

// tcpMaxIdle bounds the idle TCP connections kept per upstream.
const tcpMaxIdle = 4

var (
	errUpstreamClosed = errors.New("upstream closed")
	errAnswerMismatch = errors.New("answer does not carry the question asked")
)

type upstream struct {
	addr    netip.AddrPort
	timeout time.Duration

	mu     sync.Mutex
	sock   *udpSock // current socket; nil until first use or after an error
	idle   []*tcpConn
	closed bool
	wg     sync.WaitGroup // socket readers
}

func newUpstream(addr netip.AddrPort, timeout time.Duration) *upstream {
	return &upstream{addr: addr, timeout: timeout}
}

// udpSock is one connected UDP socket and the queries waiting on it.
type udpSock struct {
	u       *upstream
	conn    *net.UDPConn
	pending map[uint16]*pendingQuery // guarded by u.mu
	sent    int
	retired bool
}

type pendingQuery struct {
	question []byte
	ch       chan []byte // the answer, or nil when err is set
	err      error
}

// exchangeUDP sends the packed query (its ID is overwritten) and waits for
// the matching answer until ctx ends or the timeout passes.
func (u *upstream) exchangeUDP(ctx context.Context, msg []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	pq := &pendingQuery{ch: make(chan []byte, 1)}
	_, qend, err := questionBounds(msg)
	if err != nil {
		return nil, err
	}
	pq.question = msg[headerLen:qend]

	u.mu.Lock()
	s, err := u.sockLocked()
	if err != nil {
		u.mu.Unlock()
		return nil, err
	}
	var id uint16
	for {
		id = uint16(rand.Uint32())
		if _, busy := s.pending[id]; !busy {
			break
		}
	}
	s.pending[id] = pq
	s.sent++
	if s.sent >= udpRotateAfter {
		s.retired = true
		u.sock = nil
	}
	u.mu.Unlock()
	defer u.forget(s, id)

	binary.BigEndian.PutUint16(msg, id)
	if _, err := s.conn.Write(msg); err != nil {
		return nil, fmt.Errorf("udp write %s: %w", u.addr, err)
	}
	select {
	case resp := <-pq.ch:
		if resp == nil {
			return nil, fmt.Errorf("udp %s: %w", u.addr, pq.err)
		}
		return resp, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("udp %s: %w", u.addr, ctx.Err())
	}
}

// sockLocked returns the current socket, dialing one when needed.
func (u *upstream) sockLocked() (*udpSock, error) {
	if u.closed {
		return nil, errUpstreamClosed
	}
	if u.sock != nil {
		return u.sock, nil
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(u.addr))
	if err != nil {
		return nil, fmt.Errorf("udp dial %s: %w", u.addr, err)
	}
	s := &udpSock{u: u, conn: conn, pending: make(map[uint16]*pendingQuery)}
	u.sock = s
	u.wg.Add(1)
	go s.read()
	return s, nil
}

// forget drops a finished query; a retired socket closes with its last one.
func (u *upstream) forget(s *udpSock, id uint16) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(s.pending, id)
	if s.retired && len(s.pending) == 0 {
		s.conn.Close()
	}
}

// read delivers answers to waiting queries until the socket is closed.
func (s *udpSock) read() {
	defer s.u.wg.Done()
	buf := make([]byte, maxMsgSize)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && !ne.Timeout() && !errors.Is(err, net.ErrClosed) {
				// ICMP port unreachable and the like. The socket is
				// connected to this one resolver, so every query waiting
				// on it fails now rather than at the timeout, and the
				// next query gets a fresh socket.
				s.u.mu.Lock()
				if s.u.sock == s {
					s.u.sock = nil
					s.retired = true
				}
				for id, pq := range s.pending {
					delete(s.pending, id)
					pq.err = err
					pq.ch <- nil
				}
				empty := len(s.pending) == 0
				s.u.mu.Unlock()
				if empty {
					s.conn.Close()
				}
				continue
			}
			return
		}
		if n < headerLen {
			continue
		}
		id := binary.BigEndian.Uint16(buf)
		_, qend, err := questionBounds(buf[:n])
		if err != nil {
			continue
		}
		s.u.mu.Lock()
		pq := s.pending[id]
		if pq != nil && equalFoldASCII(pq.question, buf[headerLen:qend]) {
			delete(s.pending, id)
			pq.ch <- append([]byte(nil), buf[:n]...)
		}
		s.u.mu.Unlock()
	}
}

// exchangeTCP sends the query over a pooled TCP connection. A reused
// connection the upstream has closed in the meantime is retried once on a
// fresh one.
func (u *upstream) exchangeTCP(ctx context.Context, msg []byte) ([]byte, error) {
	deadline := time.Now().Add(u.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	for attempt := 0; ; attempt++ {
		c, reused, err := u.getTCP(ctx, deadline)
		if err != nil {
			return nil, err
		}
		resp, err := c.exchange(msg, deadline)
		if err == nil {
			u.putTCP(c)
			return resp, nil
		}
		c.conn.Close()
		if !reused || attempt > 0 || ctx.Err() != nil {
			return nil, fmt.Errorf("tcp %s: %w", u.addr, err)
		}
	}
}

type tcpConn struct {
	conn     net.Conn
	lastUsed time.Time
	buf      []byte
}

func (u *upstream) getTCP(ctx context.Context, deadline time.Time) (*tcpConn, bool, error) {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil, false, errUpstreamClosed
	}
	for len(u.idle) > 0 {
		c := u.idle[len(u.idle)-1]
		u.idle = u.idle[:len(u.idle)-1]
		if time.Since(c.lastUsed) < tcpIdleTimeout {
			u.mu.Unlock()
			return c, true, nil
		}
		c.conn.Close()
	}
	u.mu.Unlock()
	d := net.Dialer{Deadline: deadline}
	conn, err := d.DialContext(ctx, "tcp", u.addr.String())
	if err != nil {
		return nil, false, fmt.Errorf("tcp dial %s: %w", u.addr, err)
	}
	return &tcpConn{conn: conn}, false, nil
}

func (u *upstream) putTCP(c *tcpConn) {
	c.lastUsed = time.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed || len(u.idle) >= tcpMaxIdle {
		c.conn.Close()
		return
	}
	u.idle = append(u.idle, c)
}

func (c *tcpConn) exchange(msg []byte, deadline time.Time) ([]byte, error) {
	if err := c.conn.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if cap(c.buf) < 2+len(msg) {
		c.buf = make([]byte, 2+len(msg))
	}
	out := c.buf[:2+len(msg)]
	binary.BigEndian.PutUint16(out, uint16(len(msg)))
	copy(out[2:], msg)
	if _, err := c.conn.Write(out); err != nil {
		return nil, err
	}
	id := binary.BigEndian.Uint16(msg)
	for {
		var l [2]byte
		if _, err := io.ReadFull(c.conn, l[:]); err != nil {
			return nil, err
		}
		resp := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c.conn, resp); err != nil {
			return nil, err
		}
		// A late answer to an earlier query on this connection: skip it.
		if len(resp) >= headerLen && binary.BigEndian.Uint16(resp) == id {
			// As over UDP, the answer must carry our question.
			_, qend, err := questionBounds(resp)
			_, mend, merr := questionBounds(msg)
			if err != nil || merr != nil || !equalFoldASCII(resp[headerLen:qend], msg[headerLen:mend]) {
				return nil, errAnswerMismatch
			}
			return resp, nil
		}
	}
}

// close closes every socket and waits for the readers.
func (u *upstream) close() {
	u.mu.Lock()
	u.closed = true
	if u.sock != nil {
		u.sock.retired = true
		u.sock.conn.Close()
		u.sock = nil
	}
	for _, c := range u.idle {
		c.conn.Close()
	}
	u.idle = nil
	u.mu.Unlock()
	u.wg.Wait()
}

// questionBounds returns the start and end of the first question of msg.
func questionBounds(msg []byte) (int, int, error) {
	if len(msg) < headerLen || binary.BigEndian.Uint16(msg[4:]) == 0 {
		return 0, 0, errBadMsg
	}
	end, err := skipName(msg, headerLen)
	if err != nil || end+4 > len(msg) {
		return 0, 0, errBadMsg
	}
	return headerLen, end + 4, nil
}

func equalFoldASCII(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}
