package sds

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outrigger-mesh/outrigger/agent/certs"
)

// Well-known paths and names, as Istio (paths relative to the agent's
// working directory, "/" in a sidecar).
const (
	DefaultSocketPath    = "./var/run/secrets/workload-spiffe-uds/socket"
	DefaultCertChainFile = "./etc/certs/cert-chain.pem"
	DefaultKeyFile       = "./etc/certs/key.pem"
	DefaultRootCertFile  = "./etc/certs/root-cert.pem"

	// WorkloadResource is the SDS name of the workload key and chain.
	WorkloadResource = "default"
	// RootResource is the SDS name of the mesh trust roots.
	RootResource = "ROOTCA"
	// FileCertPrefix names a key/cert pair on disk: file-cert:<cert>~<key>.
	FileCertPrefix = "file-cert:"
	// FileRootPrefix names a trust bundle on disk: file-root:<path>.
	FileRootPrefix = "file-root:"
	// SystemRootResource is the OS trust bundle.
	SystemRootResource = "file-root:system"
)

// CA signs the workload's CSR. *caclient.Client implements it.
type CA interface {
	// Sign returns the PEM chain (leaf first, without roots) and the PEM
	// trust roots for a certificate valid for ttl.
	Sign(ctx context.Context, csrPEM []byte, ttl time.Duration) (chainPEM, rootsPEM []byte, err error)
}

// Config is the SDS server's configuration. The zero value of each field is
// replaced by the default named in its comment.
type Config struct {
	// SocketPath is the unix socket Envoy's sds-grpc cluster dials. Default
	// ./var/run/secrets/workload-spiffe-uds/socket. Istio: the directory is
	// fixed, the file name is WORKLOAD_IDENTITY_SOCKET_FILE.
	SocketPath string

	// TrustDomain is the SPIFFE trust domain. Default cluster.local. Istio:
	// TRUST_DOMAIN (or meshConfig.trustDomain).
	TrustDomain string
	// Namespace is the pod's namespace. Required with a CA. Istio:
	// POD_NAMESPACE.
	Namespace string
	// ServiceAccount is the pod's service account. Required with a CA.
	// Istio: SERVICE_ACCOUNT.
	ServiceAccount string

	// CA signs the workload certificate. Required unless FileMountedCerts.
	CA CA
	// SecretTTL is the certificate lifetime asked of the CA. Default 24h.
	// Istio: SECRET_TTL.
	SecretTTL time.Duration
	// GracePeriodRatio is the share of the lifetime left when the
	// certificate is renewed. Default 0.5. Istio: SECRET_GRACE_PERIOD_RATIO.
	GracePeriodRatio float64
	// GracePeriodRatioJitter spreads renewals of a fleet: the ratio used is
	// GracePeriodRatio ± a random amount up to this. Default 0.01. Istio:
	// SECRET_GRACE_PERIOD_RATIO_JITTER.
	GracePeriodRatioJitter float64
	// NoJitter forces a jitter of 0 (the zero value of
	// GracePeriodRatioJitter means the default). Outrigger only.
	NoJitter bool
	// Key selects the workload key type. Default RSA 2048, as Istio
	// (ECC_SIGNATURE_ALGORITHM, ECC_CURVE, WORKLOAD_RSA_KEY_SIZE, PKCS8_KEY).
	Key certs.KeyOptions
	// InitialBackoff and MaxBackoff bound the retries when the CA fails.
	// Defaults 1s and 30s; each wait is doubled and jittered by ±20%.
	// Outrigger only (Istio retries with its own exponential backoff).
	InitialBackoff, MaxBackoff time.Duration

	// FileMountedCerts serves default and ROOTCA from files instead of the
	// CA. Istio: FILE_MOUNTED_CERTS.
	FileMountedCerts bool
	// CertChainFile, KeyFile and RootCertFile are those files. Defaults
	// ./etc/certs/{cert-chain,key,root-cert}.pem; Istio also takes them from
	// proxyMetadata ISTIO_META_TLS_CLIENT_{CERT_CHAIN,KEY,ROOT_CERT}.
	CertChainFile, KeyFile, RootCertFile string
	// FileDebounce is how long file events are gathered before the files
	// are read again. Default 100ms. Istio: FILE_DEBOUNCE_DURATION.
	FileDebounce time.Duration
	// SystemRootsFile is served as file-root:system. Default: the first of
	// the usual OS bundle locations that exists.
	SystemRootsFile string

	// Registerer receives the metrics (names in docs/sds.md). Nil: none.
	Registerer prometheus.Registerer
	// ShutdownTimeout bounds the graceful gRPC stop. Default 5s.
	ShutdownTimeout time.Duration
}

// systemRootCandidates are the OS bundle locations tried for
// file-root:system, the common Linux distributions first.
var systemRootCandidates = []string{
	"/etc/ssl/certs/ca-certificates.crt",
	"/etc/pki/tls/certs/ca-bundle.crt",
	"/etc/ssl/ca-bundle.pem",
	"/etc/pki/tls/cacert.pem",
	"/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
	"/etc/ssl/cert.pem",
}

func (c Config) withDefaults() Config {
	if c.SocketPath == "" {
		c.SocketPath = DefaultSocketPath
	}
	if c.TrustDomain == "" {
		c.TrustDomain = "cluster.local"
	}
	if c.SecretTTL == 0 {
		c.SecretTTL = 24 * time.Hour
	}
	if c.GracePeriodRatio == 0 {
		c.GracePeriodRatio = 0.5
	}
	if c.GracePeriodRatioJitter == 0 {
		c.GracePeriodRatioJitter = 0.01
	}
	if c.NoJitter {
		c.GracePeriodRatioJitter = 0
	}
	if c.InitialBackoff == 0 {
		c.InitialBackoff = time.Second
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = 30 * time.Second
	}
	if c.CertChainFile == "" {
		c.CertChainFile = DefaultCertChainFile
	}
	if c.KeyFile == "" {
		c.KeyFile = DefaultKeyFile
	}
	if c.RootCertFile == "" {
		c.RootCertFile = DefaultRootCertFile
	}
	if c.FileDebounce == 0 {
		c.FileDebounce = 100 * time.Millisecond
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 5 * time.Second
	}
	return c
}

func (c Config) validate() error {
	var errs []error
	if !c.FileMountedCerts {
		if c.CA == nil {
			errs = append(errs, errors.New("no CA client: set CA_ADDR, or FILE_MOUNTED_CERTS=true to serve ./etc/certs"))
		}
		if c.Namespace == "" {
			errs = append(errs, errors.New("POD_NAMESPACE is empty: the workload identity needs the pod's namespace"))
		}
		if c.ServiceAccount == "" {
			errs = append(errs, errors.New("SERVICE_ACCOUNT is empty: the workload identity needs the pod's service account"))
		}
		if err := c.Key.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.SecretTTL < time.Second {
		errs = append(errs, fmt.Errorf("SECRET_TTL=%s is below one second", c.SecretTTL))
	}
	if c.GracePeriodRatio < 0 || c.GracePeriodRatio > 1 {
		errs = append(errs, fmt.Errorf("SECRET_GRACE_PERIOD_RATIO=%g is outside [0,1]", c.GracePeriodRatio))
	}
	if c.GracePeriodRatioJitter < 0 || c.GracePeriodRatioJitter > 1 {
		errs = append(errs, fmt.Errorf("SECRET_GRACE_PERIOD_RATIO_JITTER=%g is outside [0,1]", c.GracePeriodRatioJitter))
	}
	if c.InitialBackoff <= 0 || c.MaxBackoff < c.InitialBackoff {
		errs = append(errs, fmt.Errorf("backoff %s..%s is not a valid range", c.InitialBackoff, c.MaxBackoff))
	}
	if filepath.Base(c.SocketPath) == "." || filepath.Base(c.SocketPath) == "/" {
		errs = append(errs, fmt.Errorf("SDS socket path %q names no file", c.SocketPath))
	}
	return errors.Join(errs...)
}
