// Package dnsproxy is the pod's DNS proxy on 15053: with DNS capture on,
// iptables sends every query the application makes to its resolvers here.
// Names from the control plane's name table (Kubernetes services with their
// short names, ServiceEntry hosts, wildcards) are answered locally from
// pre-packed records without allocating; everything else is forwarded to the
// pod's real resolvers over pooled connections, cached, and served stale when
// every resolver fails.
package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// Server is the DNS proxy. Create it with New, feed it name tables with
// UpdateNameTable, and serve with Run (once).
type Server struct {
	cfg     Config
	log     *zap.Logger
	listen  listenSpec
	builder *tableBuilder
	fwd     *forwarder
	cache   *cache // nil when disabled
	m       *metrics
	now     func() time.Time // the cache's clock; tests replace it

	table atomic.Pointer[lookupTable]

	listening chan struct{}
	addrs     []netip.AddrPort // set before listening is closed

	slow    sync.WaitGroup // forwarding goroutines
	slowSem chan struct{}
	tcpSem  chan struct{}
}

const (
	// maxInflight bounds concurrently forwarded queries.
	maxInflight = 1024
	// maxTCPConns bounds client TCP connections.
	maxTCPConns = 256
	// tcpClientIdle closes client TCP connections that send nothing.
	tcpClientIdle = 10 * time.Second
	// tcpPipeline bounds forwarded queries in flight on one connection.
	tcpPipeline = 32
)

// New validates cfg, reads resolv.conf and prepares the proxy. It does not
// listen yet; Run does.
func New(cfg Config, log *zap.Logger) (*Server, error) {
	cfg.applyDefaults()
	spec, err := parseListenAddr(cfg.ListenAddr, cfg.AllowNonLoopback)
	if err != nil {
		return nil, err
	}
	if len(cfg.Upstreams) == 0 || cfg.Search == nil {
		ups, search, err := readResolvConf(cfg.ResolvConf)
		if err != nil {
			return nil, err
		}
		if len(cfg.Upstreams) == 0 {
			cfg.Upstreams = ups
		}
		if cfg.Search == nil {
			cfg.Search = search
		}
	}
	log = log.Named("dnsproxy")
	if len(cfg.Upstreams) == 0 {
		log.Warn("no nameservers in resolv.conf: names outside the name table will get SERVFAIL", zap.String("resolv_conf", cfg.ResolvConf))
	}
	s := &Server{
		cfg:       cfg,
		log:       log,
		listen:    spec,
		builder:   newTableBuilder(cfg.Namespace, cfg.Domain, cfg.Search),
		now:       time.Now,
		listening: make(chan struct{}),
		slowSem:   make(chan struct{}, maxInflight),
		tcpSem:    make(chan struct{}, maxTCPConns),
	}
	var cacheLen func() int
	if !cfg.CacheDisabled {
		var stale time.Duration
		if !cfg.ServeStaleDisabled {
			stale = cfg.ServeStaleFor
		}
		s.cache = newCache(cfg.CacheSize, cfg.CacheMaxTTL, stale)
		cacheLen = s.cache.len
	}
	if s.m, err = newMetrics(cfg.Registerer, cacheLen); err != nil {
		return nil, err
	}
	s.fwd = newForwarder(cfg.Upstreams, cfg.ForwardTimeout, cfg.ForwardParallel, log)
	log.Info("DNS proxy configured",
		zap.String("listen", cfg.ListenAddr), zap.Stringers("upstreams", cfg.Upstreams),
		zap.Strings("search", cfg.Search), zap.String("domain", cfg.Domain),
		zap.Bool("parallel", cfg.ForwardParallel), zap.Bool("cache", s.cache != nil))
	return s, nil
}

// UpdateNameTable swaps in a new name table. The lookup structure is built
// here, on the caller's goroutine; queries see either the old or the new
// table, never a mix.
func (s *Server) UpdateNameTable(nt *nds.NameTable) {
	if nt == nil {
		nt = &nds.NameTable{}
	}
	t := s.builder.build(nt)
	s.table.Store(t)
	s.log.Debug("name table updated", zap.Int("hosts", len(nt.Table)), zap.Int("names", len(t.names)))
}

// Ready reports whether the first name table has arrived.
func (s *Server) Ready() bool { return s.table.Load() != nil }

// NameTable returns the current table for /debug/ndsz, with the generated
// names added as entries; nil before the first table.
func (s *Server) NameTable() *nds.NameTable {
	t := s.table.Load()
	if t == nil {
		return nil
	}
	return s.builder.nameTableForDebug(t.source)
}

// Listening is closed once Run has bound its sockets.
func (s *Server) Listening() <-chan struct{} { return s.listening }

// Addrs returns the bound addresses (UDP and TCP share them); valid after
// Listening is closed.
func (s *Server) Addrs() []netip.AddrPort {
	<-s.listening
	return s.addrs
}

// Run listens and serves until ctx ends, then closes every socket and waits
// for in-flight queries. It returns nil on a clean stop and an error when a
// listener cannot be bound.
func (s *Server) Run(ctx context.Context) error {
	udps, tcps, err := s.bind()
	if err != nil {
		return err
	}
	for _, c := range udps {
		s.addrs = append(s.addrs, c.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	close(s.listening)
	s.log.Info("DNS proxy listening", zap.Stringers("addrs", s.addrs))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for _, c := range udps {
		wg.Go(func() { s.serveUDP(ctx, c) })
	}
	for _, l := range tcps {
		wg.Go(func() { s.serveTCP(ctx, l) })
	}
	<-ctx.Done()
	for _, c := range udps {
		c.Close()
	}
	for _, l := range tcps {
		l.Close()
	}
	wg.Wait()
	s.slow.Wait()
	s.fwd.close()
	return nil
}

// bind opens the UDP and TCP sockets. With port 0 every socket gets the port
// the first one got (retrying when that port is taken for another socket).
func (s *Server) bind() (udps []*net.UDPConn, tcps []*net.TCPListener, err error) {
	for attempt := 0; ; attempt++ {
		udps, tcps, err = s.bindOnce()
		if err == nil || s.listen.port != 0 || attempt >= 10 || !errors.Is(err, syscall.EADDRINUSE) {
			return udps, tcps, err
		}
	}
}

func (s *Server) bindOnce() (udps []*net.UDPConn, tcps []*net.TCPListener, err error) {
	defer func() {
		if err != nil {
			for _, c := range udps {
				c.Close()
			}
			for _, l := range tcps {
				l.Close()
			}
			udps, tcps = nil, nil
		}
	}()
	var ips []netip.Addr
	optional := map[netip.Addr]bool{}
	if s.listen.localhost {
		v6 := netip.IPv6Loopback()
		ips = []netip.Addr{netip.MustParseAddr("127.0.0.1"), v6}
		optional[v6] = true
	} else {
		ips = []netip.Addr{s.listen.addr}
	}
	port := s.listen.port
	for _, ip := range ips {
		ap := netip.AddrPortFrom(ip, port)
		u, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		if err != nil {
			if optional[ip] && unavailable(err) {
				s.log.Debug("IPv6 loopback unavailable; listening on IPv4 only", zap.Error(err))
				continue
			}
			return udps, tcps, fmt.Errorf("dnsproxy: listen udp %s (DNS_PROXY_ADDR): %w", ap, err)
		}
		udps = append(udps, u)
		if port == 0 {
			port = u.LocalAddr().(*net.UDPAddr).AddrPort().Port()
			ap = netip.AddrPortFrom(ip, port)
		}
		t, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
		if err != nil {
			return udps, tcps, fmt.Errorf("dnsproxy: listen tcp %s (DNS_PROXY_ADDR): %w", ap, err)
		}
		tcps = append(tcps, t)
	}
	return udps, tcps, nil
}

// unavailable reports errors meaning "this host has no such address".
func unavailable(err error) bool {
	return errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) || errors.Is(err, syscall.EPROTONOSUPPORT)
}

// serveUDP is the read loop of one UDP socket. Table and cache hits are
// answered inline from reused buffers; misses go to a goroutine.
func (s *Server) serveUDP(ctx context.Context, c *net.UDPConn) {
	w := newWorker(s)
	buf := make([]byte, maxMsgSize)
	for {
		n, addr, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		pkt := buf[:n]
		rn, slow := w.handle(pkt, false)
		if slow {
			s.goSlow(ctx, w, pkt, false, func(resp []byte) {
				if resp != nil {
					_, _ = c.WriteToUDPAddrPort(resp, addr)
				}
			})
			continue
		}
		if rn > 0 {
			_, _ = c.WriteToUDPAddrPort(w.out[:rn], addr)
		}
	}
}

// goSlow forwards pkt on a new goroutine and hands the answer to reply.
// When too many queries are already in flight it answers SERVFAIL at once.
func (s *Server) goSlow(ctx context.Context, w *worker, pkt []byte, tcp bool, reply func([]byte)) {
	select {
	case s.slowSem <- struct{}{}:
	default:
		s.m.count(w.q.qtype, resultServfail)
		reply(w.out[:errorResponse(w.out, pkt, &w.q, rcodeServFail)])
		return
	}
	pkt = append([]byte(nil), pkt...)
	s.slow.Add(1)
	go func() {
		defer s.slow.Done()
		defer func() { <-s.slowSem }()
		reply(s.resolve(ctx, pkt, tcp)) // nil: no answer at all
	}()
}

// serveTCP accepts client connections until the listener closes.
func (s *Server) serveTCP(ctx context.Context, l *net.TCPListener) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		select {
		case s.tcpSem <- struct{}{}:
		default:
			c.Close()
			continue
		}
		wg.Go(func() {
			defer func() { <-s.tcpSem }()
			s.serveTCPConn(ctx, c)
		})
	}
}

// serveTCPConn answers length-prefixed queries on one connection (RFC
// 7766): hits in order, forwarded queries as their answers arrive.
func (s *Server) serveTCPConn(ctx context.Context, c *net.TCPConn) {
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer c.Close()
	w := newWorker(s)
	var wmu sync.Mutex
	var pending sync.WaitGroup
	defer pending.Wait()
	pipe := make(chan struct{}, tcpPipeline)
	write := func(msg []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		_ = c.SetWriteDeadline(time.Now().Add(tcpClientIdle))
		_, _ = c.Write(msg)
	}
	buf := make([]byte, 2+maxMsgSize)
	for {
		_ = c.SetReadDeadline(time.Now().Add(tcpClientIdle))
		if _, err := readFull(c, buf[:2]); err != nil {
			return
		}
		l := int(buf[0])<<8 | int(buf[1])
		if l < headerLen {
			return // nothing a DNS message can be: give up on the stream
		}
		if _, err := readFull(c, buf[2:2+l]); err != nil {
			return
		}
		pkt := buf[2 : 2+l]
		rn, slow := w.handle(pkt, true)
		if slow {
			pipe <- struct{}{}
			pending.Add(1)
			s.goSlow(ctx, w, pkt, true, func(resp []byte) {
				defer pending.Done()
				defer func() { <-pipe }()
				if resp == nil {
					return
				}
				framed := make([]byte, 2+len(resp))
				framed[0], framed[1] = byte(len(resp)>>8), byte(len(resp))
				copy(framed[2:], resp)
				write(framed)
			})
			continue
		}
		if rn > 0 {
			w.outBuf[0], w.outBuf[1] = byte(rn>>8), byte(rn)
			write(w.outBuf[:2+rn])
		}
	}
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
