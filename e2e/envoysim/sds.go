package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// heldSecret is an accepted secret and what was parsed from it.
type heldSecret struct {
	secret  *tlsv3.Secret
	version string
	updated time.Time
	chain   []*x509.Certificate // tls_certificate: leaf first
	roots   []*x509.Certificate // validation_context: trusted CAs
	keyPair *tls.Certificate
}

// sdsClient is Envoy's SDS side: one StreamSecrets stream per referenced
// secret (as Envoy opens one subscription per SdsSecretConfig) over the
// gRPC cluster the sds_config names, normally sds-grpc on the agent's
// unix socket. Accepted secrets are kept; a rejected one leaves the last
// good one in place, as in Envoy.
type sdsClient struct {
	s   *sim
	ctx context.Context

	mu       sync.Mutex
	conns    map[string]*grpc.ClientConn
	subs     map[string]context.CancelFunc // by dependency key
	secrets  map[string]*heldSecret
	answered map[string]bool // a first answer (accepted or rejected) arrived
	wg       sync.WaitGroup
}

func newSDSClient(ctx context.Context, s *sim) *sdsClient {
	return &sdsClient{s: s, ctx: ctx, conns: map[string]*grpc.ClientConn{}, subs: map[string]context.CancelFunc{},
		secrets: map[string]*heldSecret{}, answered: map[string]bool{}}
}

// ensure subscribes to every wanted secret not yet subscribed and drops
// subscriptions nothing references any more.
func (c *sdsClient) ensure(want []dependency) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx.Err() != nil {
		return
	}
	keep := map[string]bool{}
	for _, d := range want {
		keep[d.key()] = true
		if _, ok := c.subs[d.key()]; ok {
			continue
		}
		conn, err := c.connLocked(d.cluster)
		if err != nil {
			c.s.log.Printf("warning: sds: secret %q: %v", d.name, err)
			c.s.stats.inc("sds." + d.name + ".update_failure")
			continue
		}
		ctx, cancel := context.WithCancel(c.ctx)
		c.subs[d.key()] = cancel
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.subscribe(ctx, conn, d.name)
		}()
	}
	for k, cancel := range c.subs {
		if !keep[k] {
			cancel()
			delete(c.subs, k)
		}
	}
}

func (c *sdsClient) connLocked(cluster string) (*grpc.ClientConn, error) {
	if conn, ok := c.conns[cluster]; ok {
		return conn, nil
	}
	if cluster == "" {
		return nil, errors.New("sds_config has no envoy_grpc cluster (envoysim supports api_config_source GRPC only)")
	}
	network, address, err := clusterAddress(c.s, cluster)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient("passthrough:///"+cluster,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, address)
		}))
	if err != nil {
		return nil, fmt.Errorf("sds cluster %s: %w", cluster, err)
	}
	c.conns[cluster] = conn
	return conn, nil
}

// close ends every subscription and waits for them.
func (c *sdsClient) close() {
	c.mu.Lock()
	for _, cancel := range c.subs {
		cancel()
	}
	c.mu.Unlock()
	c.wg.Wait()
	c.mu.Lock()
	for _, conn := range c.conns {
		conn.Close()
	}
	c.mu.Unlock()
}

// subscribe keeps one secret's stream open, reconnecting with backoff.
func (c *sdsClient) subscribe(ctx context.Context, conn *grpc.ClientConn, name string) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		start := time.Now()
		err := c.stream(ctx, conn, name)
		if ctx.Err() != nil {
			return
		}
		c.s.stats.inc("sds." + name + ".update_failure")
		if time.Since(start) > 10*time.Second {
			backoff = 200 * time.Millisecond
		}
		d := backoff/2 + time.Duration(rand.Int64N(int64(backoff)/2+1))
		c.s.log.Printf("warning: StreamSecrets gRPC config stream for %q closed: %v; retrying in %v", name, err, d.Round(time.Millisecond))
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, 3*time.Second)
	}
}

func (c *sdsClient) stream(ctx context.Context, conn *grpc.ClientConn, name string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		return err
	}
	version := c.version(name)
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: c.s.bs.GetNode(), TypeUrl: secretType,
		ResourceNames: []string{name}, VersionInfo: version}); err != nil {
		return err
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		h, verr := parseSecretResponse(resp, name)
		c.s.stats.inc("sds." + name + ".update_attempt")
		ack := &discoveryv3.DiscoveryRequest{TypeUrl: secretType, ResourceNames: []string{name}, ResponseNonce: resp.GetNonce()}
		if verr != nil {
			c.s.stats.inc("sds." + name + ".update_rejected")
			c.s.log.Printf("warning: gRPC config for %s rejected: %v", secretType, verr)
			ack.ErrorDetail = nackStatus(verr)
		} else {
			c.s.stats.inc("sds." + name + ".update_success")
			version = resp.GetVersionInfo()
			h.version = version
			c.s.log.Printf("sds: secret %q version %q accepted", name, version)
		}
		ack.VersionInfo = version
		c.mu.Lock()
		if h != nil {
			c.secrets[name] = h
		}
		c.answered[name] = true
		c.mu.Unlock()
		c.s.slowAckFor()
		if err := st.Send(ack); err != nil {
			return err
		}
		c.s.changed()
	}
}

func (c *sdsClient) version(name string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if h := c.secrets[name]; h != nil {
		return h.version
	}
	return ""
}

func (c *sdsClient) isAnswered(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.answered[name]
}

// held returns the accepted secrets sorted by name.
func (c *sdsClient) held() []*heldSecret {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*heldSecret, 0, len(c.secrets))
	for _, h := range c.secrets {
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].secret.GetName() < out[j].secret.GetName() })
	return out
}

func (c *sdsClient) get(name string) *heldSecret {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.secrets[name]
}

// parseSecretResponse checks an SDS response as Envoy does: exactly the
// requested secret, PEMs that parse, and a private key matching its
// certificate.
func parseSecretResponse(resp *discoveryv3.DiscoveryResponse, want string) (*heldSecret, error) {
	if resp.GetTypeUrl() != secretType {
		return nil, fmt.Errorf("unexpected type %s in an SDS response", resp.GetTypeUrl())
	}
	if n := len(resp.GetResources()); n != 1 {
		return nil, fmt.Errorf("Unexpected SDS secrets length: %d", n)
	}
	sec := &tlsv3.Secret{}
	if err := resp.GetResources()[0].UnmarshalTo(sec); err != nil {
		return nil, fmt.Errorf("secret: %w", err)
	}
	if err := validateDeep(sec); err != nil {
		return nil, fmt.Errorf("proto constraint validation failed (%w)", err)
	}
	if sec.GetName() != want {
		return nil, fmt.Errorf("Unexpected SDS secret (expecting %s): %s", want, sec.GetName())
	}
	h := &heldSecret{secret: sec, updated: time.Now()}
	switch t := sec.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		certPEM, err := dataSource(t.TlsCertificate.GetCertificateChain())
		if err != nil {
			return nil, fmt.Errorf("secret %s: certificate_chain: %w", want, err)
		}
		keyPEM, err := dataSource(t.TlsCertificate.GetPrivateKey())
		if err != nil {
			return nil, fmt.Errorf("secret %s: private_key: %w", want, err)
		}
		if h.chain, err = parseCerts(certPEM); err != nil {
			return nil, fmt.Errorf("Failed to load certificate chain from secret %s: %w", want, err)
		}
		kp, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("Failed to load private key from secret %s: %w", want, err)
		}
		h.keyPair = &kp
	case *tlsv3.Secret_ValidationContext:
		caPEM, err := dataSource(t.ValidationContext.GetTrustedCa())
		if err != nil {
			return nil, fmt.Errorf("secret %s: trusted_ca: %w", want, err)
		}
		if h.roots, err = parseCerts(caPEM); err != nil {
			return nil, fmt.Errorf("Failed to load trusted CA certificates from secret %s: %w", want, err)
		}
	case nil:
		return nil, fmt.Errorf("secret %s has no type", want)
	}
	return h, nil
}

// dataSource reads an Envoy DataSource (inline or file).
func dataSource(d *corev3.DataSource) ([]byte, error) {
	switch v := d.GetSpecifier().(type) {
	case *corev3.DataSource_InlineBytes:
		return v.InlineBytes, nil
	case *corev3.DataSource_InlineString:
		return []byte(v.InlineString), nil
	case *corev3.DataSource_Filename:
		return os.ReadFile(v.Filename)
	}
	return nil, errors.New("empty data source")
}

// parseCerts parses every CERTIFICATE block; at least one is required and
// nothing else may be in the data.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate found")
	}
	return out, nil
}
