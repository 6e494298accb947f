package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"
)

const hcmType = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

// simListener is one listener, bound or not. Static HTTP listeners (an
// http_connection_manager in the bootstrap) answer /stats/prometheus like
// Istio's 15090 listener; every other bound listener proxies (see
// handleTCP in proxy.go).
type simListener struct {
	s        *sim
	cfg      *listenerv3.Listener
	name     string
	addr     string // bound address, or the configured one when not bound
	ip       netip.Addr
	port     uint16
	prefix   string
	inbound  bool
	static   bool // from the bootstrap
	ln       net.Listener
	http     *http.Server
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	draining bool
	closed   bool
}

type listenerManager struct {
	s      *sim
	mu     sync.Mutex
	active map[string]*simListener
}

func newListenerManager(s *sim) *listenerManager {
	return &listenerManager{s: s, active: map[string]*simListener{}}
}

func (m *listenerManager) list() []*simListener {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*simListener
	for _, l := range m.active {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// add binds and serves l. A listener without a socket address (internal
// listeners) or with bind_to_port false (Istio's per-service outbound
// listeners) is recorded but not bound: connections reach it only when a
// use_original_dst listener hands them over.
func (m *listenerManager) add(cfg *listenerv3.Listener, dynamic bool) error {
	l := &simListener{s: m.s, cfg: cfg, name: cfg.GetName(), conns: map[net.Conn]struct{}{}, static: !dynamic,
		inbound: cfg.GetTrafficDirection() == corev3.TrafficDirection_INBOUND}
	if sa := cfg.GetAddress().GetSocketAddress(); sa != nil {
		l.addr = net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
		l.prefix = listenerStatName(sa.GetAddress(), sa.GetPortValue())
		if cfg.GetStatPrefix() != "" {
			l.prefix = "listener." + cfg.GetStatPrefix()
		}
		if ap, err := netip.ParseAddr(sa.GetAddress()); err == nil {
			l.ip, l.port = ap.Unmap(), uint16(sa.GetPortValue())
		}
	}
	if l.addr != "" && (cfg.GetBindToPort() == nil || cfg.GetBindToPort().GetValue()) {
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			return fmt.Errorf("cannot bind '%s': %w", l.addr, err)
		}
		l.ln = ln
		l.addr = ln.Addr().String()
		go l.serve()
	}
	m.mu.Lock()
	m.active[l.name] = l
	n := len(m.active)
	m.mu.Unlock()
	m.s.stats.set("listener_manager.total_listeners_active", uint64(n))
	if dynamic {
		m.s.stats.inc("listener_manager.listener_added")
	}
	return nil
}

// update applies an LDS state: listeners not in want are removed, new or
// changed ones (re)bound. Bind errors reject the update, as in Envoy.
func (m *listenerManager) update(want map[string]*listenerv3.Listener) error {
	var errs []error
	m.mu.Lock()
	var stale []*simListener
	for name, l := range m.active {
		nl, ok := want[name]
		if !ok && isStatic(m.s, name) {
			continue
		}
		if !ok || !proto.Equal(nl, l.cfg) {
			stale = append(stale, l)
			delete(m.active, name)
		}
	}
	m.mu.Unlock()
	for _, l := range stale {
		l.close()
		m.s.stats.inc("listener_manager.listener_removed")
	}
	for name, cfg := range want {
		m.mu.Lock()
		_, exists := m.active[name]
		m.mu.Unlock()
		if exists {
			continue
		}
		if err := m.add(cfg, true); err != nil {
			errs = append(errs, fmt.Errorf("listener %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

func isStatic(s *sim, name string) bool {
	for _, l := range s.bs.GetStaticResources().GetListeners() {
		if l.GetName() == name {
			return true
		}
	}
	return false
}

// drain starts draining the selected listeners: existing connections stay,
// HTTP connections are told to close (immediate strategy); after the drain
// time the listeners close, and unless skipExit the server exits, as
// Envoy's /drain_listeners?graceful does.
func (m *listenerManager) drain(inboundOnly, graceful, skipExit bool) {
	var sel []*simListener
	for _, l := range m.list() {
		if inboundOnly && !l.inbound {
			continue
		}
		sel = append(sel, l)
	}
	m.s.stats.set("listener_manager.total_listeners_draining", uint64(len(sel)))
	m.s.log.Printf("draining %d listeners (inboundonly=%v graceful=%v skip_exit=%v)", len(sel), inboundOnly, graceful, skipExit)
	for _, l := range sel {
		l.mu.Lock()
		l.draining = true
		l.mu.Unlock()
		if l.http != nil {
			l.http.SetKeepAlivesEnabled(false)
		}
	}
	finish := func() {
		for _, l := range sel {
			l.close()
		}
		if graceful && !skipExit {
			m.s.log.Printf("drain time elapsed; shutting down")
			m.s.requestExit(0)
		}
	}
	if !graceful {
		finish()
		return
	}
	time.AfterFunc(m.s.opts.drainTime, finish)
}

func (m *listenerManager) closeAll() {
	for _, l := range m.list() {
		l.close()
	}
}

func (l *simListener) close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	conns := l.conns
	l.conns = map[net.Conn]struct{}{}
	l.mu.Unlock()
	if l.ln != nil {
		l.ln.Close()
	}
	if l.http != nil {
		l.http.Close()
	}
	for c := range conns {
		c.Close()
	}
}

func (l *simListener) isHTTP() bool {
	for _, fc := range l.cfg.GetFilterChains() {
		for _, f := range fc.GetFilters() {
			if f.GetTypedConfig().GetTypeUrl() == hcmType {
				return true
			}
		}
	}
	return false
}

func (l *simListener) serve() {
	l.s.log.Printf("listener %s on %s", l.name, l.ln.Addr())
	if l.static && l.isHTTP() {
		mux := http.NewServeMux()
		mux.HandleFunc("/stats/prometheus", l.s.handlePrometheus)
		l.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		_ = l.http.Serve(countingListener{l})
		return
	}
	for {
		c, err := countingListener{l}.Accept()
		if err != nil {
			return
		}
		go l.handleTCP(c)
	}
}

// countingListener keeps downstream_cx_active/total of its listener and
// tracks open connections so a drain end can close them.
type countingListener struct{ l *simListener }

func (c countingListener) Accept() (net.Conn, error) {
	conn, err := c.l.ln.Accept()
	if err != nil {
		return nil, err
	}
	l := c.l
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		conn.Close()
		return nil, net.ErrClosed
	}
	tc := &trackedConn{Conn: conn, l: l}
	l.conns[tc] = struct{}{}
	l.mu.Unlock()
	l.s.stats.gaugeAdd(l.prefix+".downstream_cx_active", 1)
	l.s.stats.inc(l.prefix + ".downstream_cx_total")
	return tc, nil
}

func (c countingListener) Close() error   { return c.l.ln.Close() }
func (c countingListener) Addr() net.Addr { return c.l.ln.Addr() }

type trackedConn struct {
	net.Conn
	l    *simListener
	once sync.Once
}

func (t *trackedConn) Close() error {
	err := t.Conn.Close()
	t.once.Do(func() {
		t.l.mu.Lock()
		delete(t.l.conns, t)
		t.l.mu.Unlock()
		t.l.s.stats.gaugeAdd(t.l.prefix+".downstream_cx_active", -1)
	})
	return err
}
