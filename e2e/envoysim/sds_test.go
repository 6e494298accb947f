package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/outrigger-mesh/outrigger/agent/sds"
	"github.com/outrigger-mesh/outrigger/e2e/envoysim/simtest"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

const spiffeID = "spiffe://cluster.local/ns/demo/sa/app"

// shortDir is a temp dir with a path short enough for unix sockets.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "esds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// issue writes a fresh key and a certificate for spiffeID signed by ca,
// and returns the certificate.
func issue(t *testing.T, ca *testca.CA, certFile, keyFile string) *x509.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.Sign(&k.PublicKey, spiffeID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	// Key first: the agent reloads after a debounce, and a key that does
	// not match yet is retried.
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(certPEM)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// startAgentSDS runs the agent's SDS server with file-mounted certificates.
func startAgentSDS(t *testing.T, socket, certFile, keyFile, rootFile string) {
	t.Helper()
	srv, err := sds.New(sds.Config{SocketPath: socket, FileMountedCerts: true, CertChainFile: certFile, KeyFile: keyFile,
		RootCertFile: rootFile, FileDebounce: 20 * time.Millisecond, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond},
		zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sds: %v", err)
		}
	})
}

func (r *simRun) certs(t *testing.T) *adminv3.Certificates {
	t.Helper()
	code, body := r.get(t, "/certs")
	if code != http.StatusOK {
		t.Fatalf("/certs = %d", code)
	}
	out := &adminv3.Certificates{}
	if err := protojson.Unmarshal([]byte(body), out); err != nil {
		t.Fatalf("/certs: %v\n%s", err, body)
	}
	return out
}

func (r *simRun) eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A listener that needs default and ROOTCA keeps the server from going
// LIVE until the agent's SDS server has sent both; /certs then shows the
// workload's SPIFFE ID and the root, and a certificate replaced on disk
// reaches envoysim.
func TestSDSFromAgent(t *testing.T) {
	dir := shortDir(t)
	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, rootFile := filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root-cert.pem")
	first := issue(t, ca, certFile, keyFile)
	if err := ca.WriteRoot(rootFile); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "sds", "socket")
	r := startSim(t, simtest.Bootstrap{AdminTCP: true, SDSSocket: socket,
		Listeners: []string{simtest.MTLSListener("virtualInbound", "default", "ROOTCA")}}.JSON())

	// No SDS server yet: warming, not live, both secrets wanted.
	time.Sleep(300 * time.Millisecond)
	if code, body := r.get(t, "/ready"); code != http.StatusServiceUnavailable {
		t.Errorf("/ready = %d %q without secrets, want 503", code, body)
	}
	_, body := r.get(t, "/config_dump?resource=dynamic_warming_secrets")
	for _, n := range []string{`"default"`, `"ROOTCA"`} {
		if !strings.Contains(body, n) {
			t.Errorf("warming secrets lack %s:\n%s", n, body)
		}
	}

	startAgentSDS(t, socket, certFile, keyFile, rootFile)
	r.eventually(t, "LIVE", func() bool { code, _ := r.get(t, "/ready"); return code == http.StatusOK })

	certs := r.certs(t)
	if len(certs.GetCertificates()) != 1 {
		t.Fatalf("/certs has %d contexts, want 1: %v", len(certs.GetCertificates()), certs)
	}
	c := certs.GetCertificates()[0]
	if n := len(c.GetCertChain()); n != 1 || c.GetCertChain()[0].GetSubjectAltNames()[0].GetUri() != spiffeID {
		t.Errorf("cert_chain = %v, want one certificate for %s", c.GetCertChain(), spiffeID)
	}
	if got, want := c.GetCertChain()[0].GetSerialNumber(), hex.EncodeToString(first.SerialNumber.Bytes()); got != want {
		t.Errorf("serial = %s, want %s", got, want)
	}
	if d := c.GetCertChain()[0].GetDaysUntilExpiration(); d != 0 {
		t.Errorf("days_until_expiration = %d for a one-hour certificate", d)
	}
	if len(c.GetCaCert()) != 1 {
		t.Errorf("ca_cert = %v, want the root", c.GetCaCert())
	}
	_, statsBody := r.get(t, `/stats?filter=^sds\.`)
	for _, want := range []string{"sds.default.update_success: 1\n", "sds.ROOTCA.update_success: 1\n"} {
		if !strings.Contains(statsBody, want) {
			t.Errorf("stats lack %q:\n%s", want, statsBody)
		}
	}
	// The config dump redacts the key.
	_, dump := r.get(t, "/config_dump?resource=dynamic_active_secrets")
	if !strings.Contains(dump, "[redacted]") || strings.Contains(dump, "PRIVATE KEY") {
		t.Errorf("secrets dump does not redact the key:\n%s", dump)
	}

	// Rotation on disk reaches envoysim.
	second := issue(t, ca, certFile, keyFile)
	want := hex.EncodeToString(second.SerialNumber.Bytes())
	r.eventually(t, "the new certificate in /certs", func() bool {
		cs := r.certs(t).GetCertificates()
		return len(cs) == 1 && len(cs[0].GetCertChain()) == 1 && cs[0].GetCertChain()[0].GetSerialNumber() == want
	})
}

// fakeSDS sends the secrets a test hands it, one stream per name, and
// reports the requests (ACKs and NACKs) it gets.
type fakeSDS struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	send chan *tlsv3.Secret
	reqs chan *discoveryv3.DiscoveryRequest
}

func (f *fakeSDS) StreamSecrets(st grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	errc := make(chan error, 1)
	go func() {
		for {
			req, err := st.Recv()
			if err != nil {
				errc <- err
				return
			}
			select {
			case f.reqs <- req:
			case <-st.Context().Done():
				return
			}
		}
	}()
	for v := 1; ; v++ {
		select {
		case sec := <-f.send:
			a, err := anypb.New(sec)
			if err != nil {
				return err
			}
			if err := st.Send(&discoveryv3.DiscoveryResponse{VersionInfo: fmt.Sprint(v), Nonce: fmt.Sprint("n", v),
				TypeUrl: secretType, Resources: []*anypb.Any{a}}); err != nil {
				return err
			}
		case err := <-errc:
			return err
		case <-st.Context().Done():
			return nil
		}
	}
}

func tlsSecret(name string, cert, key []byte) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: cert}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: key}},
	}}}
}

// Invalid secrets are NACKed with the reason and counted as rejected; the
// server stays unready until a good one arrives, which is ACKed.
func TestSDSNACK(t *testing.T) {
	dir := shortDir(t)
	socket := filepath.Join(dir, "sds.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeSDS{send: make(chan *tlsv3.Secret, 1), reqs: make(chan *discoveryv3.DiscoveryRequest, 16)}
	g := grpc.NewServer()
	secretv3.RegisterSecretDiscoveryServiceServer(g, f)
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)

	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	issue(t, ca, certFile, keyFile)
	cert, _ := os.ReadFile(certFile)
	key, _ := os.ReadFile(keyFile)
	otherKey := filepath.Join(dir, "k2.pem")
	issue(t, ca, filepath.Join(dir, "c2.pem"), otherKey)
	wrongKey, _ := os.ReadFile(otherKey)

	listener := fmt.Sprintf(`{"name": "in", "bind_to_port": false, "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
	  "filter_chains": [{"transport_socket": {"name": "tls", "typed_config": {
	    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
	    "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": %s}]}}},
	  "filters": [{"name": "t", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "in", "cluster": "x"}}]}]}`,
		simtest.SDSConfig)
	r := startSim(t, simtest.Bootstrap{AdminTCP: true, SDSSocket: socket, Listeners: []string{listener}}.JSON())

	next := func() *discoveryv3.DiscoveryRequest {
		t.Helper()
		select {
		case req := <-f.reqs:
			return req
		case <-time.After(10 * time.Second):
			t.Fatal("no SDS request")
		}
		return nil
	}
	if req := next(); len(req.GetResourceNames()) != 1 || req.GetResourceNames()[0] != "default" || req.GetNode().GetId() == "" {
		t.Fatalf("first request = %v, want default with the node", req)
	}
	tests := []struct {
		name    string
		secret  *tlsv3.Secret
		wantErr string
	}{
		{"key does not match", tlsSecret("default", cert, wrongKey), "private key"},
		{"wrong name", tlsSecret("other", cert, key), "Unexpected SDS secret (expecting default): other"},
		{"not PEM", tlsSecret("default", []byte("junk"), key), "certificate chain"},
	}
	for i, tt := range tests {
		f.send <- tt.secret
		req := next()
		if !strings.Contains(req.GetErrorDetail().GetMessage(), tt.wantErr) {
			t.Errorf("%s: NACK = %q, want it to mention %q", tt.name, req.GetErrorDetail().GetMessage(), tt.wantErr)
		}
		if req.GetVersionInfo() != "" {
			t.Errorf("%s: NACK version_info = %q, want the last accepted (none)", tt.name, req.GetVersionInfo())
		}
		r.waitStat(t, fmt.Sprintf("sds.default.update_rejected: %d", i+1))
	}
	// A rejected secret still ends warming (Envoy's init target is
	// released on a failed update) but nothing is held.
	if cs := r.certs(t).GetCertificates(); len(cs) != 1 || len(cs[0].GetCertChain()) != 0 {
		t.Errorf("/certs after rejections = %v, want no certificate", cs)
	}
	f.send <- tlsSecret("default", cert, key)
	if req := next(); req.GetErrorDetail() != nil || req.GetVersionInfo() != "4" || req.GetResponseNonce() != "n4" {
		t.Errorf("ACK = %v, want version 4 nonce n4 without error", req)
	}
	r.waitStat(t, "sds.default.update_success: 1")
	if cs := r.certs(t).GetCertificates(); len(cs) != 1 || len(cs[0].GetCertChain()) != 1 {
		t.Errorf("/certs = %v, want the accepted certificate", cs)
	}
}
