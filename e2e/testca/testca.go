// Package testca is a mesh CA for tests: it speaks Istio's
// IstioCertificateService, signs CSRs under a self-signed root with the TTL
// asked for, checks the bearer token, and can be stopped, restarted and told
// to misbehave so the agent's refusals can be tested.
package testca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/outrigger-mesh/outrigger/agent/caclient"
)

// Config configures the test CA.
type Config struct {
	// Addr to listen on. Default 127.0.0.1:0 (a free port, kept across
	// Stop/Start).
	Addr string
	// TLS serves TLS with a certificate for ServerSANs signed by the root;
	// otherwise plaintext.
	TLS bool
	// ServerSANs are the DNS names or IPs in the serving certificate.
	// Default localhost and 127.0.0.1.
	ServerSANs []string
	// Token, when set, must come as "authorization: Bearer <Token>".
	Token string
	// DefaultTTL is used when a request asks for none. Default 24h.
	DefaultTTL time.Duration
	// RootsApart sends the roots in the response's root_cert field (newer
	// istiod) instead of as the last cert_chain entry.
	RootsApart bool
}

// Fault makes the CA misbehave.
type Fault int

// Faults.
const (
	FaultNone           Fault = iota
	FaultUnavailable          // answer codes.Unavailable
	FaultWrongKey             // certify a different public key
	FaultWrongIdentity        // certify another SPIFFE ID
	FaultExpired              // issue an already expired certificate
	FaultUntrustedChain       // sign with a root other than the one returned
)

// Seen is what one request carried.
type Seen struct {
	Authorization string
	ClusterID     string
	Metadata      metadata.MD
	CertSigner    string
	TTL           time.Duration
	URIs          []string
}

// CA is the test CA.
type CA struct {
	cfg     Config
	root    *x509.Certificate
	rootKey crypto.Signer
	rootPEM []byte
	other   *x509.Certificate // a second root for FaultUntrustedChain
	otherK  crypto.Signer
	addr    string
	tlsCert tls.Certificate

	mu     sync.Mutex
	fault  Fault
	seen   []Seen
	issued int
	srv    *grpc.Server
	done   chan struct{}
}

// New makes the root and reserves the address; call Start to serve.
func New(cfg Config) (*CA, error) {
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if len(cfg.ServerSANs) == 0 {
		cfg.ServerSANs = []string{"localhost", "127.0.0.1"}
	}
	if cfg.DefaultTTL == 0 {
		cfg.DefaultTTL = 24 * time.Hour
	}
	c := &CA{cfg: cfg}
	var err error
	if c.root, c.rootKey, err = selfSigned("testca root"); err != nil {
		return nil, err
	}
	if c.other, c.otherK, err = selfSigned("testca other root"); err != nil {
		return nil, err
	}
	c.rootPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.root.Raw})
	if cfg.TLS {
		if c.tlsCert, err = c.servingCert(); err != nil {
			return nil, err
		}
	}
	l, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("testca: reserve %s: %w", cfg.Addr, err)
	}
	c.addr = l.Addr().String()
	l.Close()
	return c, nil
}

// Addr is host:port.
func (c *CA) Addr() string { return c.addr }

// RootPEM is the root every good certificate chains to.
func (c *CA) RootPEM() []byte { return c.rootPEM }

// WriteRoot writes the root to path (0644: a root is public).
func (c *CA) WriteRoot(path string) error { return os.WriteFile(path, c.rootPEM, 0o644) }

// SetFault changes how the CA answers from now on.
func (c *CA) SetFault(f Fault) {
	c.mu.Lock()
	c.fault = f
	c.mu.Unlock()
}

// Seen returns the requests received so far.
func (c *CA) Seen() []Seen {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Seen(nil), c.seen...)
}

// Issued is the number of certificates signed.
func (c *CA) Issued() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.issued
}

// Start serves on Addr. It is an error to start a running CA.
func (c *CA) Start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv != nil {
		return errors.New("testca: already running")
	}
	var l net.Listener
	var err error
	// The port was free a moment ago; a restart may race with TIME_WAIT
	// or a closing listener, so try a few times.
	for i := 0; i < 50; i++ {
		if l, err = net.Listen("tcp", c.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("testca: listen %s: %w", c.addr, err)
	}
	opts := []grpc.ServerOption{grpc.ForceServerCodecV2(caclient.Codec{})}
	if c.cfg.TLS {
		opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{c.tlsCert}, MinVersion: tls.VersionTLS12})))
	}
	srv := grpc.NewServer(opts...)
	caclient.RegisterCertificateServer(srv, c)
	c.srv = srv
	done := make(chan struct{})
	c.done = done
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	return nil
}

// Stop closes the listener and every connection at once.
func (c *CA) Stop() {
	c.mu.Lock()
	srv, done := c.srv, c.done
	c.srv = nil
	c.mu.Unlock()
	if srv != nil {
		srv.Stop()
		<-done
	}
}

// CreateCertificate implements caclient.CertificateServer.
func (c *CA) CreateCertificate(ctx context.Context, req *caclient.Request) (*caclient.Response, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	seen := Seen{
		Metadata:   md.Copy(),
		CertSigner: req.Metadata.GetFields()["CertSigner"].GetStringValue(),
		TTL:        time.Duration(req.ValidityDuration) * time.Second,
	}
	if v := md.Get("authorization"); len(v) > 0 {
		seen.Authorization = v[0]
	}
	if v := md.Get("clusterid"); len(v) > 0 {
		seen.ClusterID = v[0]
	}
	blk, _ := pem.Decode([]byte(req.CSR))
	var csr *x509.CertificateRequest
	var csrErr error
	if blk == nil {
		csrErr = errors.New("CSR is not PEM")
	} else if csr, csrErr = x509.ParseCertificateRequest(blk.Bytes); csrErr == nil {
		csrErr = csr.CheckSignature()
		for _, u := range csr.URIs {
			seen.URIs = append(seen.URIs, u.String())
		}
	}
	c.mu.Lock()
	c.seen = append(c.seen, seen)
	fault := c.fault
	c.mu.Unlock()

	if c.cfg.Token != "" && seen.Authorization != "Bearer "+c.cfg.Token {
		return nil, status.Error(codes.Unauthenticated, "request authenticate failure")
	}
	if fault == FaultUnavailable {
		return nil, status.Error(codes.Unavailable, "testca: unavailable (fault injected)")
	}
	if csrErr != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bad CSR: %v", csrErr)
	}
	ttl := seen.TTL
	if ttl <= 0 {
		ttl = c.cfg.DefaultTTL
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		NotBefore:             now.Add(-time.Second),
		NotAfter:              now.Add(ttl),
		URIs:                  csr.URIs,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	pub := csr.PublicKey
	parent, parentKey := c.root, c.rootKey
	switch fault {
	case FaultWrongKey:
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		pub = k.Public()
	case FaultWrongIdentity:
		tmpl.URIs = []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/intruder/sa/intruder"}}
	case FaultExpired:
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-2*time.Hour), now.Add(-time.Hour)
	case FaultUntrustedChain:
		parent, parentKey = c.other, c.otherK
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sign: %v", err)
	}
	c.mu.Lock()
	c.issued++
	c.mu.Unlock()
	leaf := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	if c.cfg.RootsApart {
		return &caclient.Response{CertChain: []string{leaf}, RootCert: []string{string(c.rootPEM)}}, nil
	}
	return &caclient.Response{CertChain: []string{leaf, string(c.rootPEM)}}, nil
}

// Sign issues a certificate for any key and SPIFFE ID directly, for tests
// that write certificates to disk.
func (c *CA) Sign(pub crypto.PublicKey, id string, ttl time.Duration) ([]byte, error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(ttl),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.root, pub, c.rootKey)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

func (c *CA) servingCert() (tls.Certificate, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "testca"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, s := range c.cfg.ServerSANs {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.root, k.Public(), c.rootKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}, nil
}

func selfSigned(cn string) (*x509.Certificate, crypto.Signer, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"outrigger test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return cert, k, err
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
