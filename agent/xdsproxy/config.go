// Package xdsproxy is the pod's xDS proxy: Envoy (and proxyless gRPC
// applications) speak ADS, State-of-the-World or Delta, to the agent on a unix
// socket, and the agent carries each stream to the control plane (istiod).
//
// On the way it takes out what is meant for the agent (the DNS name table,
// NDS), keeps the last configuration Envoy accepted, and survives the control
// plane going away: Envoy's stream stays open while the agent reconnects with
// jittered backoff and replays Envoy's subscriptions, and an Envoy that
// (re)starts during an outage is served the last-known-good configuration.
package xdsproxy

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// Defaults, in one place.
const (
	DefaultSocketPath        = "./etc/istio/proxy/XDS"
	DefaultRootCAPath        = "./var/run/secrets/istio/root-cert.pem"
	DefaultTokenPath         = "./var/run/secrets/tokens/istio-token"
	DefaultKeepaliveInterval = 30 * time.Second
	DefaultKeepaliveTimeout  = 10 * time.Second
	DefaultInitialBackoff    = 100 * time.Millisecond
	DefaultMaxBackoff        = 5 * time.Second
	DefaultConnectTimeout    = 5 * time.Second
	DefaultStallTimeout      = 5 * time.Minute
	// SystemRootCA is the XDS_ROOT_CA value that selects the system pool.
	SystemRootCA = "SYSTEM"
	// defaultIstiodSAN is the server name used when the discovery address
	// is on localhost (as Istio does).
	defaultIstiodSAN = "istiod.istio-system.svc"
	// maxMsgSize is the largest message accepted in either direction. Envoy
	// has no limit of its own on ADS responses; 7 MB CDS pushes are normal
	// for 3000-service meshes, so anything below a few hundred MB would be a
	// cap below Envoy's.
	maxMsgSize = 1<<31 - 1
)

// Config configures the proxy. Zero values take the defaults above.
type Config struct {
	// SocketPath is the unix socket Envoy connects to: <configPath>/XDS
	// (Istio: ProxyConfig.configPath + "/XDS"). Default ./etc/istio/proxy/XDS.
	SocketPath string
	// DiscoveryAddress is the control plane, host:port (Istio:
	// ProxyConfig.discoveryAddress, default istiod.istio-system.svc:15012).
	// Required.
	DiscoveryAddress string
	// Plaintext turns TLS off for the upstream connection (Istio:
	// ProxyConfig.controlPlaneAuthPolicy NONE). The token is not sent over
	// plaintext.
	Plaintext bool
	// RootCAPath is the root certificate file that verifies the control
	// plane, or "SYSTEM" for the system pool (Istio: XDS_ROOT_CA). Read
	// afresh on every connection. Default ./var/run/secrets/istio/root-cert.pem.
	RootCAPath string
	// ServerName is the TLS server name expected of the control plane
	// (Istio: ISTIOD_SAN). Default: the host of DiscoveryAddress, or
	// istiod.istio-system.svc when that host is localhost.
	ServerName string
	// TokenPath is the JWT sent as "authorization: Bearer" on each new
	// upstream connection; a missing file means no header. Default
	// ./var/run/secrets/tokens/istio-token (Istio: JWT_POLICY third-party-jwt).
	TokenPath string
	// ClusterID is sent as gRPC metadata "ClusterID" (Istio:
	// ISTIO_META_CLUSTER_ID).
	ClusterID string
	// Headers are extra gRPC metadata on the upstream stream (Istio:
	// XDS_HEADER_<NAME>=value; see HeadersFromEnv).
	Headers map[string]string
	// KeepaliveInterval and KeepaliveTimeout are the gRPC keepalive of both
	// the socket server and the upstream client (Istio:
	// GRPC_KEEPALIVE_INTERVAL / GRPC_KEEPALIVE_TIMEOUT, 30s / 10s).
	KeepaliveInterval, KeepaliveTimeout time.Duration
	// InitialBackoff and MaxBackoff bound the jittered exponential backoff
	// between upstream connection attempts (Outrigger only; Istio leaves
	// reconnects to Envoy). Default 100ms and 5s.
	InitialBackoff, MaxBackoff time.Duration
	// ConnectTimeout bounds one upstream connection attempt (Istio: 5s).
	ConnectTimeout time.Duration
	// StallTimeout recycles an upstream stream that has sent nothing for
	// this long while a request waits for an answer (Outrigger only).
	// Default 5m.
	StallTimeout time.Duration
	// Transport carries the streams: TransportCutThrough (default), the
	// agent's own HTTP/2 transport (internal/h2grpc) that forwards large
	// responses while they arrive, or TransportGRPC, grpc-go on both sides
	// (whole messages, store and forward), kept as a fallback (Outrigger
	// only: OUTRIGGER_XDS_TRANSPORT).
	Transport string
	// OnNameTable receives each DNS name table (NDS). Nil means the DNS
	// proxy is off and NDS is not requested. An error NACKs the table.
	OnNameTable func(*nds.NameTable) error
	// Registerer receives the proxy's metrics; nil means none. The status
	// server wraps it with the istio_agent_ prefix.
	Registerer prometheus.Registerer
}

// The values of Config.Transport.
const (
	TransportCutThrough = "cut-through"
	TransportGRPC       = "grpc"
)

func (c *Config) setDefaults() error {
	switch c.Transport {
	case "":
		c.Transport = TransportCutThrough
	case TransportCutThrough, TransportGRPC:
	default:
		return fmt.Errorf("xdsproxy: transport %q (OUTRIGGER_XDS_TRANSPORT): want %q or %q", c.Transport, TransportCutThrough, TransportGRPC)
	}
	if c.DiscoveryAddress == "" {
		return errors.New("xdsproxy: no discovery address: set ProxyConfig.discoveryAddress (e.g. istiod.istio-system.svc:15012)")
	}
	host, _, err := net.SplitHostPort(c.DiscoveryAddress)
	if err != nil {
		return fmt.Errorf("xdsproxy: discovery address %q: want host:port: %w", c.DiscoveryAddress, err)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	if c.SocketPath == "" {
		c.SocketPath = DefaultSocketPath
	}
	if c.RootCAPath == "" {
		c.RootCAPath = DefaultRootCAPath
	}
	if c.TokenPath == "" {
		c.TokenPath = DefaultTokenPath
	}
	if c.ServerName == "" {
		c.ServerName = host
		if strings.Contains(host, "localhost") {
			c.ServerName = defaultIstiodSAN
		}
	}
	def(&c.KeepaliveInterval, DefaultKeepaliveInterval)
	def(&c.KeepaliveTimeout, DefaultKeepaliveTimeout)
	def(&c.InitialBackoff, DefaultInitialBackoff)
	def(&c.MaxBackoff, DefaultMaxBackoff)
	def(&c.ConnectTimeout, DefaultConnectTimeout)
	def(&c.StallTimeout, DefaultStallTimeout)
	if c.MaxBackoff < c.InitialBackoff {
		c.MaxBackoff = c.InitialBackoff
	}
	return nil
}

// HeadersFromEnv returns the XDS_HEADER_<NAME>=value entries of environ
// (os.Environ() form) as metadata NAME: value, as Istio does.
func HeadersFromEnv(environ []string) map[string]string {
	const prefix = "XDS_HEADER_"
	out := map[string]string{}
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(k, prefix) || len(k) == len(prefix) {
			continue
		}
		out[k[len(prefix):]] = v
	}
	return out
}
