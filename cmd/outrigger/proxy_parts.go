package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/agent/bootstrap"
	"github.com/outrigger-mesh/outrigger/agent/caclient"
	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/agent/config"
	"github.com/outrigger-mesh/outrigger/agent/envoy"
	"github.com/outrigger-mesh/outrigger/agent/grpcxds"
	"github.com/outrigger-mesh/outrigger/agent/sds"
	"github.com/outrigger-mesh/outrigger/agent/xdsproxy"
	"github.com/outrigger-mesh/outrigger/dnsproxy"
	"github.com/outrigger-mesh/outrigger/health"
	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// Well-known pod paths (relative to the agent's working directory, "/" in
// a pod), as Istio uses them.
const (
	sdsSocketDir         = "./var/run/secrets/workload-spiffe-uds"
	defaultSDSSocketFile = "socket"
	// agentMetricsPrefix is the prefix Istio gives the agent's own metrics
	// on 15020.
	agentMetricsPrefix = "istio_agent_"
)

// partsInput is what the parts of proxy mode are configured from.
type partsInput struct {
	pc           *config.ProxyConfig
	node         *config.Node
	env          config.Env
	typ          config.ProxyType
	flags        *proxyFlags
	bopts        bootstrap.Options
	disableEnvoy bool
	start        time.Time
}

// proxyParts are the parts that run beside Envoy.
type proxyParts struct {
	components []component
	health     *health.Server // nil when statusPort is 0
	ca         *caclient.Client
	log        *zap.Logger
	// sup and quit back the status server's /drain and /quitquitquit; set
	// by wireLifecycle before anything runs.
	sup  *envoy.Proxy
	quit func()
}

// newProxyParts configures the xDS proxy, the DNS proxy, the SDS server
// and the status server from the effective config and environment, and
// writes the proxyless gRPC bootstrap. Nothing is started.
func newProxyParts(in partsInput, log *zap.Logger) (*proxyParts, error) {
	p := &proxyParts{log: log}
	reg := prometheus.NewRegistry()
	agentReg := prometheus.WrapRegistererWithPrefix(agentMetricsPrefix, reg)
	r := envReader{env: in.env}

	// DNS proxy: for sidecars with DNS capture, or anywhere it is asked for
	// explicitly (as Istio).
	var dns *dnsproxy.Server
	dnsOn, err := dnsProxyEnabled(in.env.Get, string(in.typ))
	if err != nil {
		return nil, err
	}
	dnsCapture := dnsOn && r.bool("ISTIO_META_DNS_CAPTURE", false) && in.typ == config.Sidecar
	if dnsOn {
		dcfg, err := dnsConfigFromEnv(in.env.Get, os.Getuid(), log.Named("dnsproxy"))
		if err != nil {
			return nil, err
		}
		dcfg.Namespace, dcfg.Domain = in.node.Namespace, in.node.Domain
		dcfg.Registerer = agentReg
		if dns, err = dnsproxy.New(dcfg, log.Named("dnsproxy")); err != nil {
			return nil, err
		}
		p.components = append(p.components, dns)
	}

	// xDS proxy: Envoy's only way to the control plane.
	xcfg := xdsproxy.Config{
		SocketPath:        in.pc.XDSSocketPath(),
		DiscoveryAddress:  in.pc.DiscoveryAddress,
		Plaintext:         in.pc.ControlPlaneAuthPolicy == config.AuthNone,
		RootCAPath:        r.str("XDS_ROOT_CA", ""),
		ServerName:        r.str("ISTIOD_SAN", ""),
		ClusterID:         r.str("ISTIO_META_CLUSTER_ID", ""),
		Headers:           r.prefixed("XDS_HEADER_"),
		KeepaliveInterval: r.duration("GRPC_KEEPALIVE_INTERVAL", 0),
		KeepaliveTimeout:  r.duration("GRPC_KEEPALIVE_TIMEOUT", 0),
		Transport:         r.str("OUTRIGGER_XDS_TRANSPORT", ""),
		Registerer:        agentReg,
	}
	if dns != nil {
		xcfg.OnNameTable = func(t *nds.NameTable) error {
			dns.UpdateNameTable(t)
			return nil
		}
	}
	if r.err != nil {
		return nil, r.err
	}
	xds, err := xdsproxy.New(xcfg, log.Named("xdsproxy"))
	if err != nil {
		return nil, err
	}
	p.components = append(p.components, xds)

	// Workload certificates for Envoy over SDS.
	if !in.disableEnvoy {
		srv, err := p.newSDS(in, &r, reg)
		if err != nil {
			return nil, err
		}
		if srv != nil {
			p.components = append(p.components, srv)
		}
	}

	// Status server on 15020 and readiness on 15021 (statusPort 0 turns it
	// off, as in Istio).
	if in.pc.StatusPort != 0 {
		hcfg, err := health.ConfigFromEnv(in.env.Lookup)
		if err != nil {
			return nil, err
		}
		hcfg.StatusPort = in.pc.StatusPort
		hcfg.EnvoyAdminPort = in.pc.ProxyAdminPort
		// Envoy's admin and Prometheus listener are where the bootstrap put
		// them, whatever family INSTANCE_IP has.
		hcfg.Localhost = agentLoopback(in.node, in.bopts)
		hcfg.Profiling = in.flags.profiling
		hcfg.Version = version
		hcfg.StartTime = in.start
		hcfg.Registry = reg
		hcfg.OnDrain = p.drain
		hcfg.OnQuit = func() { p.quit() }
		if dns != nil {
			hcfg.NameTable = func() any {
				if t := dns.NameTable(); t != nil {
					return t
				}
				return nil
			}
			if dnsCapture {
				// With capture on, the app's lookups all go to us: not ready
				// until the name table is there (as Istio).
				hcfg.DNSReady = dns.Ready
			}
		}
		if p.health, err = health.New(hcfg, log.Named("health")); err != nil {
			return nil, err
		}
		p.components = append(p.components, p.health)
	}

	// Proxyless gRPC applications in the pod reach the control plane
	// through the same socket.
	path := r.str("GRPC_XDS_BOOTSTRAP", grpcxds.DefaultPath)
	if err := grpcxds.Write(path, grpcxds.Bootstrap{
		SocketPath: xcfg.SocketPath,
		NodeID:     in.node.ID,
		Metadata:   in.node.Metadata,
		Locality:   grpcxds.Locality(in.node.Locality),
	}); err != nil {
		return nil, fmt.Errorf("GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	return p, nil
}

// newSDS configures the SDS server: certificates from mounted files
// (FILE_MOUNTED_CERTS) or from the mesh CA. It returns nil, with a warning,
// when the pod's identity is unknown.
func (p *proxyParts) newSDS(in partsInput, r *envReader, reg prometheus.Registerer) (*sds.Server, error) {
	socketFile := r.str("WORKLOAD_IDENTITY_SOCKET_FILE", defaultSDSSocketFile)
	if socketFile != filepath.Base(socketFile) || strings.HasPrefix(socketFile, ".") {
		return nil, fmt.Errorf("env WORKLOAD_IDENTITY_SOCKET_FILE: %q must be a bare file name (the directory is %s)", socketFile, sdsSocketDir)
	}
	cfg := sds.Config{
		SocketPath:             filepath.Join(sdsSocketDir, socketFile),
		TrustDomain:            r.str("TRUST_DOMAIN", ""),
		Namespace:              in.node.Namespace,
		ServiceAccount:         r.str("SERVICE_ACCOUNT", ""),
		SecretTTL:              r.duration("SECRET_TTL", 0),
		GracePeriodRatio:       r.float("SECRET_GRACE_PERIOD_RATIO", 0),
		GracePeriodRatioJitter: r.float("SECRET_GRACE_PERIOD_RATIO_JITTER", 0),
		Key: certs.KeyOptions{
			ECCSignatureAlgorithm: r.str("ECC_SIGNATURE_ALGORITHM", ""),
			ECCCurve:              r.str("ECC_CURVE", ""),
			RSAKeySize:            r.int("WORKLOAD_RSA_KEY_SIZE", 0),
			PKCS8:                 r.bool("PKCS8_KEY", false),
		},
		FileMountedCerts: r.bool("FILE_MOUNTED_CERTS", false),
		FileDebounce:     r.duration("FILE_DEBOUNCE_DURATION", 0),
		Registerer:       reg,
	}
	if cfg.FileMountedCerts {
		cfg.CertChainFile = r.str("ISTIO_META_TLS_CLIENT_CERT_CHAIN", "")
		cfg.KeyFile = r.str("ISTIO_META_TLS_CLIENT_KEY", "")
		cfg.RootCertFile = r.str("ISTIO_META_TLS_CLIENT_ROOT_CERT", "")
	}
	if r.err != nil {
		return nil, r.err
	}
	if !cfg.FileMountedCerts {
		if cfg.Namespace == "" || cfg.ServiceAccount == "" {
			p.log.Warn("workload certificates are off: POD_NAMESPACE and SERVICE_ACCOUNT must both be set (the injection template sets them) for the agent to ask the CA for a certificate")
			return nil, nil
		}
		ca, err := caclient.New(caclient.Config{
			Address:      r.str("CA_ADDR", in.pc.DiscoveryAddress),
			RootCertFile: r.str("CA_ROOT_CA", ""),
			ServerName:   r.str("ISTIOD_SAN", ""),
			ClusterID:    r.str("ISTIO_META_CLUSTER_ID", ""),
			CertSigner:   r.str("ISTIO_META_CERT_SIGNER", ""),
			Headers:      r.prefixed("CA_HEADER_"),
		}, p.log.Named("caclient"))
		if err != nil {
			return nil, err
		}
		p.ca = ca
		cfg.CA = ca
	}
	return sds.New(cfg, p.log.Named("sds"))
}

// wireLifecycle connects the status server's lifecycle endpoints to the
// Envoy supervisor (nil without Envoy): POST /drain starts Envoy's drain,
// POST /quitquitquit runs quit. Call it before the parts run.
func (p *proxyParts) wireLifecycle(sup *envoy.Proxy, quit func()) {
	p.sup, p.quit = sup, quit
}

// drain serves POST /drain: Envoy starts draining while the agent keeps
// running. It returns at once, as the preStop hook of a native sidecar
// expects.
func (p *proxyParts) drain() {
	if p.sup == nil {
		return
	}
	go func() {
		if err := p.sup.Drain(context.Background()); err != nil && !errors.Is(err, context.Canceled) {
			p.log.Warn("drain requested on /drain failed", zap.Error(err))
		}
	}()
}

// beginShutdown runs the moment the agent starts shutting down: readiness
// turns 503 at once, before Envoy's drain.
func (p *proxyParts) beginShutdown() {
	if p.health != nil {
		p.health.SetDraining()
	}
}

// close releases what the parts hold after they have stopped.
func (p *proxyParts) close() {
	if p.ca != nil {
		_ = p.ca.Close()
	}
}
