// Package caclient asks the mesh CA (istiod, or anything speaking Istio's
// IstioCertificateService) to sign the workload's CSR. It is the agent's only
// outbound path for identity: TLS to the CA with the mesh root, the pod's
// service-account token on every call, the cluster ID as metadata.
package caclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
)

// Well-known paths inside the pod (relative to the agent's working directory,
// "/" in a sidecar), as Istio.
const (
	DefaultRootCertFile = "./var/run/secrets/istio/root-cert.pem"
	DefaultTokenFile    = "./var/run/secrets/tokens/istio-token"
	// SystemRoots as RootCertFile means the operating system's trust store.
	SystemRoots = "SYSTEM"
	// plaintextPort is the port Istio treats as plaintext CA/XDS.
	plaintextPort = "15010"
)

// Config is the CA client's configuration. The zero value of each field is
// replaced by the default named in its comment.
type Config struct {
	// Address is the CA's host:port. Required. Istio: CA_ADDR, falling back
	// to ProxyConfig.discoveryAddress (istiod.istio-system.svc:15012). An
	// address on port 15010 is dialled in plaintext, as Istio.
	Address string
	// RootCertFile holds the PEM roots that verify the CA's serving
	// certificate; SYSTEM means the OS trust store. It is re-read when it
	// changes, so a rotated mesh root is picked up without a restart.
	// Default ./var/run/secrets/istio/root-cert.pem. Istio: CA_ROOT_CA.
	RootCertFile string
	// ServerName is the name the CA's certificate must carry. Default: the
	// host part of Address. Istio: ISTIOD_SAN.
	ServerName string
	// TokenFile is the projected service-account token sent as
	// "authorization: Bearer <token>", read afresh for every call because
	// the kubelet rotates it. Default ./var/run/secrets/tokens/istio-token.
	// Set NoToken to send none.
	TokenFile string
	// NoToken sends no authorization header (e.g. a CA that authenticates
	// by mTLS only). Outrigger only.
	NoToken bool
	// ClusterID is sent as gRPC metadata "ClusterID". Istio:
	// ISTIO_META_CLUSTER_ID.
	ClusterID string
	// CertSigner goes in the request metadata as "CertSigner". Istio:
	// ISTIO_META_CERT_SIGNER.
	CertSigner string
	// Headers are extra gRPC metadata on every call. Istio: CA_HEADER_<NAME>.
	Headers map[string]string
	// DialTimeout bounds one CreateCertificate call, connection included.
	// Default 10s (Istio's total CSR timeout).
	DialTimeout time.Duration
}

func (c Config) withDefaults() Config {
	if c.RootCertFile == "" {
		c.RootCertFile = DefaultRootCertFile
	}
	if c.TokenFile == "" {
		c.TokenFile = DefaultTokenFile
	}
	if c.ServerName == "" {
		if host, _, err := net.SplitHostPort(c.Address); err == nil {
			c.ServerName = host
		}
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = 10 * time.Second
	}
	return c
}

// Plaintext reports whether the CA is dialled without TLS: Istio's rule is
// "the address ends in :15010".
func (c Config) Plaintext() bool {
	return strings.HasSuffix(c.Address, ":"+plaintextPort)
}

// Client signs CSRs with the CA. It is safe for concurrent use.
type Client struct {
	cfg  Config
	log  *zap.Logger
	conn *grpc.ClientConn
}

// New validates cfg and prepares a lazily connecting client; the CA need not
// be up yet.
func New(cfg Config, log *zap.Logger) (*Client, error) {
	cfg = cfg.withDefaults()
	if cfg.Address == "" {
		return nil, errors.New("caclient: no CA address: set CA_ADDR or the discovery address")
	}
	if _, _, err := net.SplitHostPort(cfg.Address); err != nil {
		return nil, fmt.Errorf("caclient: CA_ADDR %q is not host:port: %w", cfg.Address, err)
	}
	log = log.Named("caclient")
	opts := []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(Codec{})),
	}
	if cfg.Plaintext() {
		log.Info("CA address is on port 15010: using plaintext", zap.String("address", cfg.Address))
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		roots := &rootPool{path: cfg.RootCertFile}
		if _, err := roots.get(); err != nil {
			// Not fatal: the root is a mounted ConfigMap that can arrive
			// after us. Every handshake re-reads it.
			log.Warn("CA root certificate not usable yet; will retry on each connection", zap.Error(err))
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(roots.tlsConfig(cfg.ServerName))))
	}
	if !cfg.NoToken {
		opts = append(opts, grpc.WithPerRPCCredentials(tokenFile(cfg.TokenFile)))
	}
	conn, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("caclient: dial %s: %w", cfg.Address, err)
	}
	return &Client{cfg: cfg, log: log, conn: conn}, nil
}

// Close releases the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Address is the CA address in use.
func (c *Client) Address() string { return c.cfg.Address }

// Sign sends csrPEM to the CA asking for a certificate valid for ttl. It
// returns the chain (leaf first, without the roots) and the trust roots, both
// PEM. Like Istio, when the CA does not send roots apart, the last entry of
// the chain is taken as the roots.
func (c *Client) Sign(ctx context.Context, csrPEM []byte, ttl time.Duration) (chainPEM, rootsPEM []byte, err error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	md := metadata.Pairs("ClusterID", c.cfg.ClusterID)
	for k, v := range c.cfg.Headers {
		md.Append(k, v)
	}
	ctx = metadata.NewOutgoingContext(ctx, md)
	req := &Request{
		CSR:              string(csrPEM),
		ValidityDuration: int64(ttl / time.Second),
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			"CertSigner": structpb.NewStringValue(c.cfg.CertSigner),
		}},
	}
	resp := new(Response)
	if err := c.conn.Invoke(ctx, CreateCertificateMethod, req, resp); err != nil {
		return nil, nil, fmt.Errorf("CreateCertificate at %s: %w", c.cfg.Address, err)
	}
	return SplitResponse(resp)
}

// SplitResponse separates the chain from the roots as Istio does.
func SplitResponse(resp *Response) (chainPEM, rootsPEM []byte, err error) {
	chain := resp.CertChain
	var roots []string
	switch {
	case len(resp.RootCert) > 0:
		roots = resp.RootCert
	case len(chain) >= 2:
		roots = chain[len(chain)-1:]
		chain = chain[:len(chain)-1]
	default:
		return nil, nil, fmt.Errorf("CA response has %d certificate(s) and no roots; want leaf and root", len(chain))
	}
	if len(chain) == 0 {
		return nil, nil, errors.New("CA response has no certificate chain")
	}
	return joinPEM(chain), joinPEM(roots), nil
}

// joinPEM concatenates PEM blocks, each on its own lines.
func joinPEM(blocks []string) []byte {
	var b bytes.Buffer
	for _, s := range blocks {
		b.WriteString(strings.TrimSpace(s))
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// tokenFile attaches the bearer token read from a file to every call.
type tokenFile string

func (t tokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(string(t))
	if err != nil {
		return nil, fmt.Errorf("read CA token: %w (the projected token istio-token must be mounted)", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return nil, fmt.Errorf("CA token file %s is empty", string(t))
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

// RequireTransportSecurity is false: Istio sends the token on plaintext
// :15010 too.
func (tokenFile) RequireTransportSecurity() bool { return false }

// rootPool is the CA trust store, reloaded when its file changes.
type rootPool struct {
	path string

	mu      sync.Mutex
	pool    *x509.CertPool
	modTime time.Time
	size    int64
}

func (r *rootPool) get() (*x509.CertPool, error) {
	if r.path == SystemRoots {
		pool, err := x509.SystemCertPool()
		if err != nil {
			return nil, fmt.Errorf("system trust store (CA_ROOT_CA=SYSTEM): %w", err)
		}
		return pool, nil
	}
	fi, err := os.Stat(r.path)
	if err != nil {
		return nil, fmt.Errorf("CA root certificate (CA_ROOT_CA): %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pool != nil && fi.ModTime().Equal(r.modTime) && fi.Size() == r.size {
		return r.pool, nil
	}
	b, err := os.ReadFile(r.path)
	if err != nil {
		return nil, fmt.Errorf("CA root certificate (CA_ROOT_CA): %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("CA root certificate %s (CA_ROOT_CA) holds no PEM certificate", r.path)
	}
	r.pool, r.modTime, r.size = pool, fi.ModTime(), fi.Size()
	return pool, nil
}

// tlsConfig verifies the server itself so that the root file is read at
// handshake time, not once at start.
func (r *rootPool) tlsConfig(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         serverName,
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			pool, err := r.get()
			if err != nil {
				return err
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("CA sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err = cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				DNSName:       serverName,
				Roots:         pool,
				Intermediates: inter,
				KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("verify CA certificate for %q against %s: %w", serverName, r.path, err)
			}
			return nil
		},
	}
}
