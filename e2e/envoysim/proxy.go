package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"

	"github.com/outrigger-mesh/outrigger/iptables"
)

const (
	tcpProxyType     = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
	originalDstType  = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
	originalDstName  = "envoy.filters.listener.original_dst"
	upstreamDialWait = 5 * time.Second
	maxHead          = 16 << 10 // largest HTTP request head peekHTTP reads
)

// direction names the traffic direction for the access log: the
// listener's traffic_direction, else outbound for a use_original_dst
// listener (Istio's 15001) and inbound otherwise.
func direction(cfg *listenerv3.Listener) string {
	switch cfg.GetTrafficDirection() {
	case corev3.TrafficDirection_INBOUND:
		return "inbound"
	case corev3.TrafficDirection_OUTBOUND:
		return "outbound"
	}
	if cfg.GetUseOriginalDst().GetValue() {
		return "outbound"
	}
	return "inbound"
}

// match finds the listener for an original destination, as Envoy's
// use_original_dst does: the exact address first, then a wildcard address
// on the port. self is never returned.
func (m *listenerManager) match(dst netip.AddrPort, self *simListener) *simListener {
	var wildcard *simListener
	for _, l := range m.list() {
		if l == self || !l.ip.IsValid() || l.port != dst.Port() {
			continue
		}
		if l.ip == dst.Addr().Unmap() {
			return l
		}
		if l.ip.IsUnspecified() && l.ip.Is4() == dst.Addr().Unmap().Is4() {
			wildcard = l
		}
	}
	return wildcard
}

// proxied is one downstream connection being proxied.
type proxied struct {
	down       net.Conn
	br         *bufio.Reader // reads down; may hold peeked bytes
	src, dst   string
	redirected bool
	listener   string
	cluster    string
	upstream   string
	note       string
}

// handleTCP serves one connection on a bound, non-HTTP listener. With
// original_dst the destination is the one iptables rewrote; a
// use_original_dst listener hands the connection to the listener of that
// destination when there is one (bind_to_port false listeners included).
// The chosen filter chain's tcp_proxy or http_connection_manager picks a
// cluster, and the cluster an upstream: the original destination
// (ORIGINAL_DST), or an endpoint from EDS or the load assignment. A
// listener without any of that echoes, so a test can hold a connection
// open and see it work.
func (l *simListener) handleTCP(c net.Conn) {
	defer c.Close()
	p := &proxied{down: c, br: bufio.NewReaderSize(c, maxHead), src: c.RemoteAddr().String(), dst: c.LocalAddr().String(), listener: l.name}
	local, _ := netip.ParseAddrPort(c.LocalAddr().String())
	dst := local
	if tcp, ok := c.(*trackedConn).Conn.(*net.TCPConn); ok {
		if d, err := iptables.OriginalDst(tcp); err == nil && d != local {
			dst, p.redirected = d, true
			p.dst = d.String()
		}
	}
	target := l
	if p.redirected && l.cfg.GetUseOriginalDst().GetValue() {
		if h := l.s.listeners.match(dst, l); h != nil {
			target = h
			p.listener = l.name + ">" + h.name
		}
	}
	dir := direction(l.cfg)
	chain := target.chooseChain(p, dst)
	upAddr, local6, err := l.s.pickUpstream(p, chain, dst)
	if err != nil {
		l.s.accessLog(dir, p, 0, 0, err)
		return
	}
	if upAddr == "" { // nothing to forward to: echo
		n, _ := io.Copy(c, p.br)
		p.upstream = "echo"
		if p.cluster != "" {
			p.upstream = "echo (cluster has no endpoints)"
		}
		l.s.accessLog(dir, p, n, n, nil)
		return
	}
	d := net.Dialer{Timeout: upstreamDialWait}
	if local6.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: local6.AsSlice()}
	}
	up, err := d.Dial("tcp", upAddr)
	if err != nil {
		if p.cluster != "" {
			l.s.stats.inc("cluster." + p.cluster + ".upstream_cx_connect_fail")
		}
		l.s.accessLog(dir, p, 0, 0, fmt.Errorf("upstream connect: %w", err))
		return
	}
	defer up.Close()
	if p.cluster != "" {
		l.s.stats.inc("cluster." + p.cluster + ".upstream_cx_total")
	}
	var rx, tx int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		rx, _ = io.Copy(up, p.br)
		if t, ok := up.(*net.TCPConn); ok {
			_ = t.CloseWrite()
		}
	}()
	tx, _ = io.Copy(c, up)
	if t, ok := c.(*trackedConn).Conn.(*net.TCPConn); ok {
		_ = t.CloseWrite()
	}
	wg.Wait()
	l.s.accessLog(dir, p, rx, tx, nil)
}

// accessLog writes one line per connection to stdout.
func (s *sim) accessLog(dir string, p *proxied, rx, tx int64, err error) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s -> %s", dir, p.src, p.dst)
	if p.redirected {
		b.WriteString(" (original destination)")
	}
	fmt.Fprintf(&b, " listener=%s", p.listener)
	if p.cluster != "" {
		fmt.Fprintf(&b, " cluster=%s", p.cluster)
	}
	if p.upstream != "" {
		fmt.Fprintf(&b, " upstream=%s", p.upstream)
	}
	if p.note != "" {
		fmt.Fprintf(&b, " %s", p.note)
	}
	fmt.Fprintf(&b, " bytes=%d/%d", rx, tx)
	if err != nil {
		fmt.Fprintf(&b, " error=%q", err.Error())
	}
	s.alog.Print(b.String())
}

// chooseChain picks the filter chain for dst: a chain whose
// filter_chain_match fits (destination_port, prefix_ranges,
// transport_protocol by peeking for a TLS handshake), preferring one that
// names the port, else default_filter_chain. server_names and
// application_protocols are not looked at.
func (l *simListener) chooseChain(p *proxied, dst netip.AddrPort) *listenerv3.FilterChain {
	var proto string
	needProto := false
	for _, fc := range l.cfg.GetFilterChains() {
		if fc.GetFilterChainMatch().GetTransportProtocol() != "" {
			needProto = true
		}
	}
	if needProto {
		_ = p.down.SetReadDeadline(time.Now().Add(time.Second))
		if b, err := p.br.Peek(1); err == nil && b[0] == 0x16 {
			proto = "tls"
		} else {
			proto = "raw_buffer"
		}
		_ = p.down.SetReadDeadline(time.Time{})
	}
	var best *listenerv3.FilterChain
	bestScore := -1
	for _, fc := range l.cfg.GetFilterChains() {
		m := fc.GetFilterChainMatch()
		score := 0
		if dp := m.GetDestinationPort(); dp != nil {
			if dp.GetValue() != uint32(dst.Port()) {
				continue
			}
			score += 4
		}
		if len(m.GetPrefixRanges()) > 0 {
			if !inRanges(dst.Addr(), m.GetPrefixRanges()) {
				continue
			}
			score += 2
		}
		if tp := m.GetTransportProtocol(); tp != "" {
			if tp != proto {
				continue
			}
			score++
		}
		if score > bestScore {
			best, bestScore = fc, score
		}
	}
	if best == nil {
		best = l.cfg.GetDefaultFilterChain()
	}
	return best
}

func inRanges(a netip.Addr, ranges []*corev3.CidrRange) bool {
	for _, r := range ranges {
		ip, err := netip.ParseAddr(r.GetAddressPrefix())
		if err != nil {
			continue
		}
		bits := int(r.GetPrefixLen().GetValue())
		if pfx, err := ip.Prefix(bits); err == nil && pfx.Contains(a.Unmap()) {
			return true
		}
	}
	return false
}

// pickUpstream resolves the chain's terminal filter to an upstream
// address, and the local address to bind (upstream_bind_config). "" means
// echo.
func (s *sim) pickUpstream(p *proxied, chain *listenerv3.FilterChain, dst netip.AddrPort) (string, netip.Addr, error) {
	for _, f := range chain.GetFilters() {
		switch f.GetTypedConfig().GetTypeUrl() {
		case tcpProxyType:
			tp := &tcpv3.TcpProxy{}
			if err := f.GetTypedConfig().UnmarshalTo(tp); err != nil {
				return "", netip.Addr{}, err
			}
			name := tp.GetCluster()
			if w := tp.GetWeightedClusters().GetClusters(); name == "" && len(w) > 0 {
				name = w[0].GetName()
			}
			return s.clusterUpstream(p, name, dst)
		case hcmType:
			h := &hcmv3.HttpConnectionManager{}
			if err := f.GetTypedConfig().UnmarshalTo(h); err != nil {
				return "", netip.Addr{}, err
			}
			host, path, err := peekHTTP(p)
			if err != nil {
				return "", netip.Addr{}, fmt.Errorf("http: %w", err)
			}
			rc := h.GetRouteConfig()
			if rds := h.GetRds(); rds != nil {
				rc = s.route(rds.GetRouteConfigName())
				if rc == nil {
					return "", netip.Addr{}, fmt.Errorf("route config %q not received (NR)", rds.GetRouteConfigName())
				}
			}
			p.note = fmt.Sprintf("host=%s path=%s", host, path)
			name := routeCluster(rc, host, path)
			if name == "" {
				return "", netip.Addr{}, fmt.Errorf("no route for host %q path %q (NR)", host, path)
			}
			return s.clusterUpstream(p, name, dst)
		}
	}
	if p.redirected {
		p.upstream = dst.String()
		return dst.String(), netip.Addr{}, nil
	}
	return "", netip.Addr{}, nil
}

// clusterUpstream picks the upstream of a cluster: the original
// destination for ORIGINAL_DST, else the next endpoint round robin.
func (s *sim) clusterUpstream(p *proxied, name string, dst netip.AddrPort) (string, netip.Addr, error) {
	p.cluster = name
	c := s.cluster(name)
	if c == nil {
		return "", netip.Addr{}, fmt.Errorf("unknown cluster %q (NC)", name)
	}
	var bind netip.Addr
	if sa := c.GetUpstreamBindConfig().GetSourceAddress(); sa != nil {
		bind, _ = netip.ParseAddr(sa.GetAddress())
	}
	if c.GetType() == clusterv3.Cluster_ORIGINAL_DST {
		if !p.redirected {
			return "", netip.Addr{}, errors.New("ORIGINAL_DST cluster without an original destination")
		}
		p.upstream = dst.String()
		return dst.String(), bind, nil
	}
	var addrs []string
	for _, le := range s.endpointsOf(c).GetEndpoints() {
		for _, lb := range le.GetLbEndpoints() {
			if sa := lb.GetEndpoint().GetAddress().GetSocketAddress(); sa != nil {
				addrs = append(addrs, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
			}
		}
	}
	if len(addrs) == 0 && !p.redirected {
		// Not Envoy: a direct connection to a listener whose cluster has
		// nowhere to go is echoed, so tests can hold a live connection.
		p.upstream = "echo"
		return "", netip.Addr{}, nil
	}
	if len(addrs) == 0 {
		s.stats.inc("cluster." + name + ".upstream_cx_none_healthy")
		return "", netip.Addr{}, fmt.Errorf("cluster %q has no endpoints (UH)", name)
	}
	p.upstream = addrs[s.nextIndex(name)%len(addrs)]
	return p.upstream, bind, nil
}

// peekHTTP reads the HTTP/1 request head without consuming it and returns
// its Host and path: the first request of the connection decides the
// route for all of it (envoysim does not route per request).
func peekHTTP(p *proxied) (host, path string, err error) {
	_ = p.down.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer func() { _ = p.down.SetReadDeadline(time.Time{}) }()
	for {
		n := max(p.br.Buffered(), 1)
		b, err := p.br.Peek(n)
		if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
			req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b[:i+4])))
			if err != nil {
				return "", "", err
			}
			return req.Host, req.URL.Path, nil
		}
		if err != nil {
			return "", "", err
		}
		if n >= maxHead {
			return "", "", fmt.Errorf("request head larger than %d bytes", maxHead)
		}
		if _, err := p.br.Peek(n + 1); err != nil { // wait for more
			return "", "", err
		}
	}
}

// routeCluster matches a route configuration: the virtual host by domain
// (exact, then suffix/prefix wildcards, then "*"; with and without the
// port), then the first route whose prefix or path matches.
func routeCluster(rc *routev3.RouteConfiguration, host, path string) string {
	vh := matchVirtualHost(rc.GetVirtualHosts(), host)
	if vh == nil {
		if h, _, err := net.SplitHostPort(host); err == nil {
			vh = matchVirtualHost(rc.GetVirtualHosts(), h)
		}
	}
	for _, r := range vh.GetRoutes() {
		m := r.GetMatch()
		ok := false
		switch {
		case m.GetPrefix() != "" || m.GetPathSpecifier() == nil:
			ok = strings.HasPrefix(path, m.GetPrefix())
		case m.GetPath() != "":
			ok = path == m.GetPath()
		default:
			ok = true // regex and others: not evaluated
		}
		if !ok {
			continue
		}
		ra := r.GetRoute()
		if c := ra.GetCluster(); c != "" {
			return c
		}
		if w := ra.GetWeightedClusters().GetClusters(); len(w) > 0 {
			return w[0].GetName()
		}
		return ""
	}
	return ""
}

func matchVirtualHost(vhs []*routev3.VirtualHost, host string) *routev3.VirtualHost {
	host = strings.ToLower(host)
	var suffix, prefix, star *routev3.VirtualHost
	for _, vh := range vhs {
		for _, d := range vh.GetDomains() {
			d = strings.ToLower(d)
			switch {
			case d == host:
				return vh
			case d == "*":
				star = vh
			case strings.HasPrefix(d, "*") && strings.HasSuffix(host, d[1:]):
				suffix = vh
			case strings.HasSuffix(d, "*") && strings.HasPrefix(host, d[:len(d)-1]):
				prefix = vh
			}
		}
	}
	for _, vh := range []*routev3.VirtualHost{suffix, prefix, star} {
		if vh != nil {
			return vh
		}
	}
	return nil
}
