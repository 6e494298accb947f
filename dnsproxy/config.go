package dnsproxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// Config is everything the DNS proxy needs. Zero values take the defaults
// documented on each field (see Defaults).
type Config struct {
	// ListenAddr is host:port for the UDP and TCP listeners. Default
	// "localhost:15053" (Istio DNS_PROXY_ADDR). "localhost" or an empty host
	// means 127.0.0.1 and, when the host has it, ::1. Any other host must be
	// a loopback address unless AllowNonLoopback: the proxy never listens on
	// the pod IP.
	ListenAddr string
	// AllowNonLoopback lets ListenAddr name a non-loopback address
	// (Outrigger only; the standalone dns-proxy command's --listen).
	AllowNonLoopback bool

	// Namespace is the proxy's namespace; Kubernetes services in it also
	// answer to their bare short name (Istio POD_NAMESPACE).
	Namespace string
	// Domain is the proxy domain, "<namespace>.svc.cluster.local" in a
	// pod (Istio --domain). Short names are generated only for hosts in it.
	Domain string

	// ResolvConf is the resolv.conf whose nameservers are the upstreams and
	// whose first search domain drives the CNAME shortcut. Default
	// "/etc/resolv.conf" (Istio uses /var/lib/istio/resolv.conf in root
	// ":53" mode). Ignored for what Upstreams/Search already set.
	ResolvConf string
	// Upstreams overrides the nameservers of ResolvConf.
	Upstreams []netip.AddrPort
	// Search overrides the search list of ResolvConf.
	Search []string

	// ForwardTimeout bounds each upstream exchange. Default 5s (Istio
	// DNS_FORWARD_TIMEOUT).
	ForwardTimeout time.Duration
	// ForwardParallel asks every upstream at once; the first good answer
	// wins. Default false: one after the other, in random order (Istio
	// DNS_FORWARD_PARALLEL).
	ForwardParallel bool
	// RespondBeforeSync forwards queries before the first name table
	// instead of answering SERVFAIL (Istio does this in root ":53" mode).
	RespondBeforeSync bool

	// CacheDisabled turns the cache of upstream answers off (Outrigger
	// only: DNS_CACHE=false). Serve-stale needs the cache.
	CacheDisabled bool
	// CacheSize bounds the cache in entries. Default 4096 (Outrigger only:
	// DNS_CACHE_SIZE).
	CacheSize int
	// CacheMaxTTL caps how long an answer is cached. Default 1h.
	CacheMaxTTL time.Duration
	// ServeStaleDisabled turns serve-stale off (Outrigger only:
	// DNS_SERVE_STALE=false).
	ServeStaleDisabled bool
	// ServeStaleFor is how long past expiry an answer may still be served
	// when every upstream fails. Default 24h (RFC 8767 suggests 1 to 3 days).
	ServeStaleFor time.Duration

	// Registerer receives the metrics. Default: a private registry.
	Registerer prometheus.Registerer
}

// Defaults.
const (
	DefaultListenAddr     = "localhost:15053"
	DefaultResolvConf     = "/etc/resolv.conf"
	DefaultForwardTimeout = 5 * time.Second
	DefaultCacheSize      = 4096
	DefaultCacheMaxTTL    = time.Hour
	DefaultServeStaleFor  = 24 * time.Hour
)

func (c *Config) applyDefaults() {
	if c.ListenAddr == "" {
		c.ListenAddr = DefaultListenAddr
	}
	if c.ResolvConf == "" {
		c.ResolvConf = DefaultResolvConf
	}
	if c.ForwardTimeout <= 0 {
		c.ForwardTimeout = DefaultForwardTimeout
	}
	if c.CacheSize <= 0 {
		c.CacheSize = DefaultCacheSize
	}
	if c.CacheMaxTTL <= 0 {
		c.CacheMaxTTL = DefaultCacheMaxTTL
	}
	if c.ServeStaleFor <= 0 {
		c.ServeStaleFor = DefaultServeStaleFor
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
}

// listenSpec is the parsed ListenAddr: explicit addresses, or loopback.
type listenSpec struct {
	addr      netip.Addr // invalid: localhost (127.0.0.1 and ::1 if present)
	port      uint16
	localhost bool
}

func parseListenAddr(s string, allowNonLoopback bool) (listenSpec, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return listenSpec{}, fmt.Errorf("dnsproxy: DNS_PROXY_ADDR %q: want host:port, e.g. %s: %w", s, DefaultListenAddr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return listenSpec{}, fmt.Errorf("dnsproxy: DNS_PROXY_ADDR %q: port %q is not a number from 0 to 65535", s, portStr)
	}
	if host == "" || host == "localhost" {
		return listenSpec{port: uint16(port), localhost: true}, nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return listenSpec{}, fmt.Errorf("dnsproxy: DNS_PROXY_ADDR %q: host must be localhost or an IP address", s)
	}
	if !ip.IsLoopback() && !allowNonLoopback {
		return listenSpec{}, fmt.Errorf("dnsproxy: DNS_PROXY_ADDR %q: %s is not a loopback address; the DNS proxy must not listen on the pod IP (use localhost:<port>)", s, ip)
	}
	return listenSpec{addr: ip.Unmap(), port: uint16(port)}, nil
}

// readResolvConf returns the nameservers (with the file's port) and the
// search list of a resolv.conf.
func readResolvConf(path string) ([]netip.AddrPort, []string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("dnsproxy: resolv.conf %s does not exist: the upstream resolvers come from it", path)
		}
		return nil, nil, fmt.Errorf("dnsproxy: read resolv.conf %s: %w", path, err)
	}
	port, err := strconv.ParseUint(cc.Port, 10, 16)
	if err != nil {
		port = 53
	}
	var ups []netip.AddrPort
	for _, s := range cc.Servers {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return nil, nil, fmt.Errorf("dnsproxy: resolv.conf %s: nameserver %q is not an IP address", path, s)
		}
		ups = append(ups, netip.AddrPortFrom(ip.Unmap(), uint16(port)))
	}
	return ups, cc.Search, nil
}
