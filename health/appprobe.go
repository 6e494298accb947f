package health

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// maxProbeBody is how much of the application's answer is passed back to
// kubelet (as Istio and kubelet).
const maxProbeBody = 10 << 10

// maxProbeRedirects is kubelet's redirect limit.
const maxProbeRedirects = 10

// prober runs the rewritten kubelet probes against the application.
type prober struct {
	log        *zap.Logger
	metrics    *metrics
	dest       netip.Addr // pod IP, or localhost in legacy mode
	src4, src6 netip.Addr
	statusPort func() uint16
	probes     AppProbes
	clients    map[string]*http.Client // per httpGet probe, built once
}

func newProber(cfg *Config, log *zap.Logger, m *metrics, statusPort func() uint16) *prober {
	p := &prober{
		log: log, metrics: m, probes: cfg.AppProbers, statusPort: statusPort,
		src4: cfg.ProbeSourceV4, src6: cfg.ProbeSourceV6,
		dest:    cfg.PodIP,
		clients: map[string]*http.Client{},
	}
	if cfg.ProbeLocalhost || !p.dest.IsValid() {
		p.dest = cfg.Localhost
	}
	for path, probe := range cfg.AppProbers {
		if probe.Kind != ProbeHTTPGet {
			continue
		}
		tr := &http.Transport{
			DialContext:       p.dial,
			DisableKeepAlives: !cfg.ProbeKeepAlive,
			// Applications serve probes on self-signed certs; kubelet does
			// not verify either.
			TLSClientConfig:     &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // as kubelet
			ForceAttemptHTTP2:   cfg.ProbeHTTP2,
			MaxIdleConnsPerHost: 1,
		}
		if !cfg.ProbeHTTP2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		p.clients[path] = &http.Client{
			Transport:     tr,
			Timeout:       probe.Timeout,
			CheckRedirect: checkProbeRedirect,
		}
	}
	return p
}

// checkProbeRedirect follows redirects on the same host, as kubelet does;
// a redirect elsewhere ends the probe with the 3xx, which counts as success.
func checkProbeRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxProbeRedirects {
		return errors.New("stopped after 10 redirects")
	}
	if req.URL.Hostname() != via[0].URL.Hostname() {
		return http.ErrUseLastResponse
	}
	return nil
}

// dial connects from the probe source address (127.0.0.6 or ::6), which the
// pod's iptables rules send straight to the application, not through Envoy.
// SO_LINGER 1s keeps probe sockets from piling up in TIME_WAIT.
func (p *prober) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{}
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		src := p.src4
		if ap.Addr().Unmap().Is6() {
			src = p.src6
		}
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(1)
	}
	return c, nil
}

func (p *prober) serveHTTP(w http.ResponseWriter, r *http.Request) {
	probe, ok := p.probes[r.URL.Path]
	if !ok {
		w.WriteHeader(http.StatusBadRequest)
		_, _ = io.WriteString(w, "app prober config does not exist for "+r.URL.Path)
		return
	}
	target := netip.AddrPortFrom(p.dest, probe.Port).String()
	var ok2 bool
	switch probe.Kind {
	case ProbeHTTPGet:
		ok2 = p.httpGet(w, r, probe, target)
	case ProbeTCPSocket:
		ok2 = p.tcp(w, r.Context(), probe, target)
	case ProbeGRPC:
		ok2 = p.grpc(w, r, probe, target)
	}
	result := "failure"
	if ok2 {
		result = "success"
	}
	p.metrics.appProbes.WithLabelValues(probe.Kind.String(), result).Inc()
}

func (p *prober) httpGet(w http.ResponseWriter, in *http.Request, probe AppProbe, target string) bool {
	scheme := "http"
	if probe.HTTPS {
		scheme = "https"
	}
	req, err := http.NewRequestWithContext(in.Context(), http.MethodGet, scheme+"://"+target+probe.Path, nil)
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return false
	}
	// kubelet sent the probe's headers to us; pass them, and the configured
	// ones, on. A Host naming the status port is rewritten to the app's port.
	req.Host = in.Host
	if host, port, err := net.SplitHostPort(in.Host); err == nil && port == strconv.Itoa(int(p.statusPort())) {
		req.Host = net.JoinHostPort(host, strconv.Itoa(int(probe.Port)))
	}
	for k, vs := range in.Header {
		req.Header[k] = append([]string(nil), vs...)
	}
	for k, vs := range probe.Headers {
		if http.CanonicalHeaderKey(k) == "Host" && len(vs) > 0 {
			req.Host = vs[0]
			continue
		}
		req.Header[http.CanonicalHeaderKey(k)] = append([]string(nil), vs...)
	}
	resp, err := p.clients[in.URL.Path].Do(req)
	if err != nil {
		p.log.Warn("app probe failed", zap.String("probe", in.URL.Path), zap.String("target", target), zap.Error(err))
		w.WriteHeader(http.StatusInternalServerError)
		return false
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 && resp.StatusCode < 400 {
		// A 3xx without its Location would confuse kubelet; it is success.
		w.WriteHeader(http.StatusOK)
		return true
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxProbeBody))
	w.WriteHeader(resp.StatusCode)
	_, _ = w.Write(body)
	return resp.StatusCode >= 200 && resp.StatusCode < 400
}

func (p *prober) tcp(w http.ResponseWriter, ctx context.Context, probe AppProbe, target string) bool {
	ctx, cancel := context.WithTimeout(ctx, probe.Timeout)
	defer cancel()
	c, err := p.dial(ctx, "tcp", target)
	if err != nil {
		p.log.Warn("app probe failed", zap.String("kind", "tcpSocket"), zap.String("target", target), zap.Error(err))
		w.WriteHeader(http.StatusInternalServerError)
		return false
	}
	_ = c.Close()
	w.WriteHeader(http.StatusOK)
	return true
}

func (p *prober) grpc(w http.ResponseWriter, in *http.Request, probe AppProbe, target string) bool {
	ctx, cancel := context.WithTimeout(in.Context(), probe.Timeout)
	defer cancel()
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return p.dial(ctx, "tcp", addr)
		}),
	}
	if ua := in.Header.Get("User-Agent"); ua != "" {
		opts = append(opts, grpc.WithUserAgent(ua))
	}
	conn, err := grpc.NewClient("passthrough:///"+target, opts...)
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return false
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: probe.Service},
		grpc.WaitForReady(true))
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		p.log.Warn("app probe failed", zap.String("kind", "grpc"), zap.String("target", target),
			zap.String("status", resp.GetStatus().String()), zap.Error(err))
		w.WriteHeader(http.StatusInternalServerError)
		return false
	}
	w.WriteHeader(http.StatusOK)
	return true
}
