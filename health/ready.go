package health

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// envoyStatsQuery is the one admin query readiness makes. Istio makes two
// (config status, then liveness); one regex covers both, so a probe costs at
// most one round trip. The query is sent unescaped, as Istio sends it, which
// every Envoy admin accepts.
const envoyStatsQuery = `usedonly&filter=^(server\.state|listener_manager\.workers_started|` +
	`cluster_manager\.cds\.update_(success|rejected)|listener_manager\.lds\.update_(success|rejected))$`

// maxAdminBody caps what readiness reads from Envoy's admin: the filtered
// stats are six short lines.
const maxAdminBody = 64 << 10

// readiness decides GET /healthz/ready. Its hot path is two atomic loads once
// Envoy has been ready: the Envoy part is sticky, as in Istio.
type readiness struct {
	log       *zap.Logger
	client    *http.Client
	statsURL  string
	noEnvoy   bool
	dnsReady  func() bool
	ttl       time.Duration
	logEvery  time.Duration
	start     time.Time
	baseCtx   context.Context // ends when the server stops; bounds admin fetches
	fetches   sync.WaitGroup
	onReady   func(time.Duration) // called once, on the first ready
	readyOnce sync.Once

	draining     atomic.Pointer[string] // why readiness is now 503 for good
	envoyReady   atomic.Bool            // sticky: LIVE, workers started, CDS and LDS accepted
	configSeen   atomic.Bool            // sticky: first CDS and LDS accepted
	lastReadyVal atomic.Bool            // last answer, for the readiness gauge

	// mu guards the cache and the in-flight fetch. It is never held while
	// talking to Envoy, so a slow admin never blocks a probe on the lock.
	mu       sync.Mutex
	cached   error
	cachedAt time.Time
	inflight *adminFetch
	lastLog  time.Time
	lastWhy  string
}

type adminFetch struct {
	done chan struct{}
	err  error
}

func newReadiness(cfg *Config, log *zap.Logger, baseCtx context.Context, onReady func(time.Duration)) *readiness {
	admin := netip.AddrPortFrom(cfg.Localhost, cfg.EnvoyAdminPort)
	u := url.URL{Scheme: "http", Host: admin.String(), Path: "/stats", RawQuery: envoyStatsQuery}
	return &readiness{
		log:      log,
		client:   &http.Client{Timeout: cfg.AdminTimeout, Transport: &http.Transport{MaxIdleConns: 2, IdleConnTimeout: 30 * time.Second}},
		statsURL: u.String(),
		noEnvoy:  cfg.EnvoyDisabled,
		dnsReady: cfg.DNSReady,
		ttl:      cfg.ReadinessCacheTTL,
		logEvery: cfg.NotReadyLogInterval,
		start:    cfg.StartTime,
		baseCtx:  baseCtx,
		onReady:  onReady,
		lastWhy:  "not checked yet",
	}
}

// setDraining makes every later check fail with why. The first cause wins.
func (r *readiness) setDraining(why string) {
	r.draining.CompareAndSwap(nil, &why)
	r.lastReadyVal.Store(false)
}

// envoyGone forgets that Envoy was ready: the process that was ready has
// exited (and may be restarted), so readiness asks Envoy again until the new
// one is LIVE with its config. Istio never restarts Envoy, so its
// stickiness never has to be undone.
func (r *readiness) envoyGone() {
	r.envoyReady.Store(false)
	r.configSeen.Store(false)
	r.mu.Lock()
	r.cachedAt = time.Time{}
	r.mu.Unlock()
	r.lastReadyVal.Store(false)
}

// check returns nil when the pod is ready. It waits at most for one admin
// round trip (bounded by AdminTimeout) or until ctx ends.
func (r *readiness) check(ctx context.Context) error {
	err := r.evaluate(ctx)
	if wasReady := r.lastReadyVal.Swap(err == nil); wasReady && err == nil {
		return nil // the hot path: nothing changed, nothing to log
	}
	r.logTransition(err)
	return err
}

func (r *readiness) evaluate(ctx context.Context) error {
	if why := r.draining.Load(); why != nil {
		return fmt.Errorf("server is terminated: %s", *why)
	}
	if !r.noEnvoy && !r.envoyReady.Load() {
		if err := r.envoyCheck(ctx); err != nil {
			return err
		}
	}
	if r.dnsReady != nil && !r.dnsReady() {
		return errors.New("DNS capture is on and the DNS name table has not arrived yet")
	}
	r.readyOnce.Do(func() {
		if r.onReady != nil {
			r.onReady(time.Since(r.start))
		}
	})
	return nil
}

// envoyCheck answers from the cache, joins a fetch in flight, or starts one.
func (r *readiness) envoyCheck(ctx context.Context) error {
	r.mu.Lock()
	if !r.cachedAt.IsZero() && time.Since(r.cachedAt) < r.ttl {
		err := r.cached
		r.mu.Unlock()
		return err
	}
	f := r.inflight
	if f == nil {
		f = &adminFetch{done: make(chan struct{})}
		r.inflight = f
		r.fetches.Add(1)
		go r.fetch(f)
	}
	r.mu.Unlock()
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return fmt.Errorf("envoy admin did not answer in time: %w", ctx.Err())
	}
}

// fetch runs one admin query on behalf of every waiting probe.
func (r *readiness) fetch(f *adminFetch) {
	defer r.fetches.Done()
	f.err = r.queryEnvoy()
	if f.err == nil {
		r.envoyReady.Store(true)
	}
	r.mu.Lock()
	r.cached, r.cachedAt, r.inflight = f.err, time.Now(), nil
	r.mu.Unlock()
	close(f.done)
}

func (r *readiness) queryEnvoy() error {
	req, err := http.NewRequestWithContext(r.baseCtx, http.MethodGet, r.statsURL, nil)
	if err != nil {
		return fmt.Errorf("envoy admin request: %w", err)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return fmt.Errorf("envoy admin unreachable (is Envoy running?): %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminBody))
	if err != nil {
		return fmt.Errorf("envoy admin stats: read: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("envoy admin stats: status %d", resp.StatusCode)
	}
	return r.judge(parseEnvoyStats(body))
}

// judge applies Istio's rules to the stats: first CDS and LDS accepted
// (remembered), then server.state LIVE (0) with workers started.
func (r *readiness) judge(s map[string]uint64) error {
	if !r.configSeen.Load() {
		cdsOK, cdsBad := s["cluster_manager.cds.update_success"], s["cluster_manager.cds.update_rejected"]
		ldsOK, ldsBad := s["listener_manager.lds.update_success"], s["listener_manager.lds.update_rejected"]
		counts := fmt.Sprintf("cds updates: %d successful, %d rejected; lds updates: %d successful, %d rejected",
			cdsOK, cdsBad, ldsOK, ldsBad)
		switch {
		case cdsOK > 0 && ldsOK > 0:
			r.configSeen.Store(true)
		case cdsOK+cdsBad+ldsOK+ldsBad == 0:
			return fmt.Errorf("config not received from the xDS server (is istiod reachable?): %s", counts)
		case cdsBad > 0 || ldsBad > 0:
			return fmt.Errorf("config received from the xDS server but rejected: %s", counts)
		default:
			return fmt.Errorf("config not fully received from the xDS server: %s", counts)
		}
	}
	state, hasState := s["server.state"]
	workers, hasWorkers := s["listener_manager.workers_started"]
	if !hasState || !hasWorkers {
		return errors.New("envoy admin stats lack server.state or listener_manager.workers_started")
	}
	if state != 0 {
		return fmt.Errorf("envoy server is not live: server.state=%d (%s)", state, serverState(state))
	}
	if workers != 1 {
		return errors.New("envoy workers have not started")
	}
	return nil
}

func serverState(s uint64) string {
	switch s {
	case 0:
		return "LIVE"
	case 1:
		return "DRAINING"
	case 2:
		return "PRE_INITIALIZING"
	case 3:
		return "INITIALIZING"
	}
	return "unknown"
}

// parseEnvoyStats reads Envoy admin's text stats ("name: value" lines).
// Lines that do not parse are skipped; a missing stat reads as absent.
func parseEnvoyStats(body []byte) map[string]uint64 {
	out := map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(val), 10, 64)
		if err != nil {
			continue
		}
		out[strings.TrimSpace(name)] = n
	}
	return out
}

// logTransition logs "ready" once per transition and "not ready" when the
// reason changes or at most every logEvery while it stays the same.
func (r *readiness) logTransition(err error) {
	now := time.Now()
	r.mu.Lock()
	var why string
	if err != nil {
		why = err.Error()
	}
	changed := why != r.lastWhy
	due := err != nil && (changed || now.Sub(r.lastLog) >= r.logEvery)
	if changed || due {
		r.lastWhy = why
		r.lastLog = now
	}
	r.mu.Unlock()
	switch {
	case err == nil && changed:
		r.log.Info("proxy is ready")
	case due:
		r.log.Warn("proxy is not ready", zap.String("reason", why))
	}
}

// wait blocks until fetches in flight are done (they end with baseCtx).
func (r *readiness) wait() { r.fetches.Wait() }
