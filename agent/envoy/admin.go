package envoy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Timeouts of the admin calls, as Istio's agent uses them.
const (
	configStatsTimeout = time.Second
	liveStatsTimeout   = 3 * time.Second
	connStatsTimeout   = 2 * time.Second
	drainTimeout       = 5 * time.Second
)

// maxAdminBody caps how much of an admin response is read: a stats dump of
// a large mesh is megabytes, never hundreds.
const maxAdminBody = 64 << 20

// Envoy's server.state values.
const (
	StateLive            = 0
	StateDraining        = 1
	StatePreInitializing = 2
	StateInitializing    = 3
)

// Admin is a small client of Envoy's admin API on 127.0.0.1:15000. Every
// call carries its own timeout so a wedged Envoy cannot stall the agent.
type Admin struct {
	base   string
	client *http.Client
}

// NewAdmin returns a client for the admin API at addr.
func NewAdmin(addr netip.AddrPort) *Admin {
	return &Admin{
		base: "http://" + addr.String(),
		// A dedicated transport: the admin API is one local peer, and its
		// connections must not mix with any other client's pool.
		client: &http.Client{Transport: &http.Transport{
			Proxy:               nil,
			MaxIdleConnsPerHost: 2,
			IdleConnTimeout:     30 * time.Second,
		}},
	}
}

// Close releases idle connections.
func (a *Admin) Close() { a.client.CloseIdleConnections() }

func (a *Admin) do(ctx context.Context, timeout time.Duration, method, pathQuery string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, a.base+pathQuery, nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("envoy admin %s %s: %w", method, pathQuery, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminBody))
	if err != nil {
		return nil, fmt.Errorf("envoy admin %s %s: read: %w", method, pathQuery, err)
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("envoy admin %s %s: status %d: %s", method, pathQuery, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return body, nil
}

// Stats is a parsed /stats text dump: counter and gauge values by name.
type Stats map[string]uint64

// ParseStats parses Envoy's text stats ("name: value" per line). Lines whose
// value is not an unsigned integer (histograms, text readouts) are skipped.
func ParseStats(r io.Reader) Stats {
	s := Stats{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		name = strings.TrimSpace(name)
		v, err := strconv.ParseUint(strings.TrimSpace(val), 10, 64)
		if name == "" || err != nil {
			continue
		}
		s[name] = v
	}
	return s
}

// Stats fetches /stats?usedonly&filter=<regex>.
func (a *Admin) Stats(ctx context.Context, filter string, timeout time.Duration) (Stats, error) {
	q := "/stats?usedonly"
	if filter != "" {
		q += "&filter=" + url.QueryEscape(filter)
	}
	body, err := a.do(ctx, timeout, http.MethodGet, q)
	if err != nil {
		return nil, err
	}
	return ParseStats(bytes.NewReader(body)), nil
}

// DrainListeners asks Envoy to drain: inbound listeners only for a sidecar,
// all for a router, gracefully (clients are told to go away, existing
// connections finish). skipExit keeps Envoy from exiting when its own drain
// time ends, for a drain that is not followed by a shutdown (/drain).
func (a *Admin) DrainListeners(ctx context.Context, inboundOnly, skipExit bool) error {
	q := "/drain_listeners?"
	if inboundOnly {
		q += "inboundonly&"
	}
	q += "graceful"
	if skipExit {
		q += "&skip_exit"
	}
	_, err := a.do(ctx, drainTimeout, http.MethodPost, q)
	return err
}

// Quit asks Envoy to exit (POST /quitquitquit).
func (a *Admin) Quit(ctx context.Context) error {
	_, err := a.do(ctx, drainTimeout, http.MethodPost, "/quitquitquit")
	return err
}

// ignoredListenerStat reports whether a downstream_cx_active stat belongs to
// a listener that never drains to zero on its own: per-worker duplicates,
// internal listeners, the admin listener and the agent's own health and
// metrics listeners. Counting them would keep a drain waiting forever.
func ignoredListenerStat(name string) bool {
	if !strings.HasPrefix(name, "listener.") {
		return true
	}
	if strings.Contains(name, ".worker_") ||
		strings.HasPrefix(name, "listener.envoy_internal_") ||
		strings.HasPrefix(name, "listener.admin.") {
		return true
	}
	for _, port := range []string{"_15021.", "_15090.", "_15014.", "_15091."} {
		if strings.Contains(name, port) {
			return true
		}
	}
	return false
}

// ActiveConnections sums downstream_cx_active over the listeners that carry
// application traffic. It returns -1 when Envoy reports no such stat at all
// (stats unavailable), so a drain does not wait on a number that never comes.
func (a *Admin) ActiveConnections(ctx context.Context) (int, error) {
	st, err := a.Stats(ctx, "downstream_cx_active$", connStatsTimeout)
	if err != nil {
		return 0, err
	}
	if len(st) == 0 {
		return -1, nil
	}
	total := 0
	for name, v := range st {
		if ignoredListenerStat(name) {
			continue
		}
		total += int(v)
	}
	return total, nil
}
