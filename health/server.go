package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
)

// Server is the status server. Create it with New, serve with Run.
type Server struct {
	cfg          Config
	log          *zap.Logger
	registry     *prometheus.Registry
	metrics      *metrics
	ready        *readiness
	prober       *prober
	scrapeClient *http.Client

	baseCtx    context.Context // bounds background admin queries
	baseCancel context.CancelFunc

	statusAddr, readinessAddr atomic.Pointer[netip.AddrPort]
	listening                 chan struct{}
}

// New validates cfg and builds the server. It opens no socket: Run does.
func New(cfg Config, log *zap.Logger) (*Server, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("health: %w", err)
	}
	if cfg.StartTime.IsZero() {
		cfg.StartTime = time.Now()
	}
	s := &Server{
		cfg:       cfg,
		log:       log.Named("health"),
		registry:  cfg.Registry,
		listening: make(chan struct{}),
		scrapeClient: &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 2,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  false,
		}},
	}
	if s.registry == nil {
		s.registry = prometheus.NewRegistry()
	}
	s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
	s.ready = newReadiness(&s.cfg, s.log, s.baseCtx, func(d time.Duration) {
		s.metrics.startup.Set(d.Seconds())
		s.log.Info("first ready", zap.Duration("since_start", d))
	})
	m, err := newMetrics(s.registry, cfg.Version, s.ready.lastReadyVal.Load)
	if err != nil {
		s.baseCancel()
		return nil, fmt.Errorf("health: %w", err)
	}
	s.metrics = m
	s.prober = newProber(&s.cfg, s.log.Named("probe"), m, s.statusPort)
	return s, nil
}

// Registry is where the agent's own metrics live; other parts register
// theirs here and they appear in the merged /stats/prometheus.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// SetDraining makes readiness answer 503 from now on, on both ports. Call it
// the moment shutdown begins (SIGTERM), before Envoy drains; Run's context
// should end only after Envoy has stopped, so kubelet and the lifecycle
// endpoints keep an answer during the drain.
func (s *Server) SetDraining() { s.ready.setDraining("the agent is shutting down") }

// EnvoyExited makes readiness 503 again until a new Envoy is LIVE with its
// config: the supervisor calls it when Envoy exits on its own, before it
// restarts Envoy (OUTRIGGER_ENVOY_RESTART).
func (s *Server) EnvoyExited() { s.ready.envoyGone() }

// Listening is closed once both ports are bound; StatusAddr and
// ReadinessAddr are valid after that.
func (s *Server) Listening() <-chan struct{} { return s.listening }

// StatusAddr is the bound status address (the real port when StatusPort was 0).
func (s *Server) StatusAddr() netip.AddrPort { return loadAddr(&s.statusAddr) }

// ReadinessAddr is the bound readiness address.
func (s *Server) ReadinessAddr() netip.AddrPort { return loadAddr(&s.readinessAddr) }

func loadAddr(p *atomic.Pointer[netip.AddrPort]) netip.AddrPort {
	if a := p.Load(); a != nil {
		return *a
	}
	return netip.AddrPort{}
}

func (s *Server) statusPort() uint16 { return s.StatusAddr().Port() }

// Run binds both ports and serves until ctx ends, then answers 503 to
// readiness while it closes the listeners gracefully. It returns nil on a
// clean stop and an error when a port cannot be bound or serving fails.
func (s *Server) Run(ctx context.Context) error {
	defer s.closeIdle()
	defer s.ready.wait()
	defer s.baseCancel()

	lnStatus, err := listen(s.cfg.BindAddr, s.cfg.StatusPort)
	if err != nil {
		return fmt.Errorf("health: listen on status port %d: %w (is another agent running? change --statusPort)", s.cfg.StatusPort, err)
	}
	lnReady, err := listen(s.cfg.BindAddr, s.cfg.ReadinessPort)
	if err != nil {
		lnStatus.Close()
		return fmt.Errorf("health: listen on readiness port %d: %w (is Envoy's bootstrap still binding it? change ENVOY_STATUS_PORT)", s.cfg.ReadinessPort, err)
	}
	for _, b := range []struct {
		ln  net.Listener
		dst *atomic.Pointer[netip.AddrPort]
	}{{lnStatus, &s.statusAddr}, {lnReady, &s.readinessAddr}} {
		ap := b.ln.Addr().(*net.TCPAddr).AddrPort()
		b.dst.Store(&ap)
	}
	close(s.listening)
	s.log.Info("status server listening", zap.Stringer("status", s.StatusAddr()), zap.Stringer("readiness", s.ReadinessAddr()))

	errLog := zap.NewStdLog(s.log.WithOptions(zap.IncreaseLevel(zap.WarnLevel)))
	servers := []*http.Server{
		{Handler: s.statusHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second, MaxHeaderBytes: 64 << 10, ErrorLog: errLog},
		{Handler: s.readinessHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second, MaxHeaderBytes: 64 << 10, ErrorLog: errLog},
	}
	g, gctx := errgroup.WithContext(ctx)
	for i, ln := range []net.Listener{lnStatus, lnReady} {
		srv := servers[i]
		g.Go(func() error {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("health: serve %s: %w", ln.Addr(), err)
			}
			return nil
		})
	}
	g.Go(func() error {
		<-gctx.Done()
		s.ready.setDraining("the agent is shutting down")
		sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
		defer cancel()
		for _, srv := range servers {
			if err := srv.Shutdown(sctx); err != nil {
				srv.Close()
			}
		}
		return nil
	})
	err = g.Wait()
	s.log.Info("status server stopped")
	return err
}

// closeIdle drops kept-alive client connections so nothing outlives Run.
func (s *Server) closeIdle() {
	s.scrapeClient.CloseIdleConnections()
	s.ready.client.CloseIdleConnections()
	for _, c := range s.prober.clients {
		c.CloseIdleConnections()
	}
}

func listen(addr netip.Addr, port uint16) (net.Listener, error) {
	return net.Listen("tcp", listenAddr(addr, port))
}

// listenAddr spells the IPv6 unspecified address (the default) as an empty
// host, as Istio's ":15020": Go then opens a dual-stack socket where IPv6
// exists and an IPv4 one on nodes booted with ipv6.disable=1, where
// "[::]:15020" fails with "address family not supported".
func listenAddr(addr netip.Addr, port uint16) string {
	if addr == netip.IPv6Unspecified() {
		return net.JoinHostPort("", strconv.Itoa(int(port)))
	}
	return netip.AddrPortFrom(addr, port).String()
}

// statusHandler routes the status port. Any path not listed is an app probe
// lookup, which answers 400 for unknown paths, as Istio.
func (s *Server) statusHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", s.handleReady)
	mux.HandleFunc("/stats/prometheus", s.handleStats)
	mux.HandleFunc("/metrics", s.handleStats)
	mux.HandleFunc("/quitquitquit", s.lifecycle(s.cfg.OnQuit, "/quitquitquit called"))
	mux.HandleFunc("/drain", s.lifecycle(s.cfg.OnDrain, "/drain called"))
	mux.Handle("/debug/ndsz", loopbackOnly(http.HandlerFunc(s.handleNdsz)))
	if s.cfg.Profiling {
		mux.Handle("/debug/pprof/", loopbackOnly(pprofHandler()))
	}
	mux.HandleFunc("/", s.prober.serveHTTP)
	return mux
}

// readinessHandler routes the readiness port: only /healthz/ready.
func (s *Server) readinessHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", s.handleReady)
	return mux
}

// handleReady answers 200 with an empty body when ready, 503 (also empty,
// as Istio) otherwise; the reason is logged, rate-limited.
func (s *Server) handleReady(w http.ResponseWriter, r *http.Request) {
	if err := s.ready.check(r.Context()); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// fromLoopback reports whether the connection came from loopback. It looks
// at the connection's remote address only; headers can be forged.
func fromLoopback(r *http.Request) bool {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	return err == nil && ap.Addr().Unmap().IsLoopback()
}

func loopbackOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !fromLoopback(r) {
			http.Error(w, "Only requests from localhost are allowed", http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	})
}
