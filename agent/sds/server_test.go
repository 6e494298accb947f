package sds

import (
	"context"
	"crypto"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// shortDir is a temp dir with a path short enough for a unix socket.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// writePair writes a fresh key and a certificate for it signed by ca.
func writePair(t *testing.T, ca *testca.CA, certPath, keyPath string) (chain []byte, key crypto.Signer) {
	t.Helper()
	return writePairTTL(t, ca, certPath, keyPath, time.Hour)
}

// writePairTTL is writePair with a certificate valid for ttl from now.
func writePairTTL(t *testing.T, ca *testca.CA, certPath, keyPath string, ttl time.Duration) (chain []byte, key crypto.Signer) {
	t.Helper()
	k, err := certs.GenerateKey(certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"})
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := certs.MarshalKey(k, false)
	chain, err = ca.Sign(k.Public(), "spiffe://cluster.local/ns/files/sa/files", ttl)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, kp, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, chain, 0o644); err != nil {
		t.Fatal(err)
	}
	return chain, k
}

type harness struct {
	srv  *Server
	reg  *prometheus.Registry
	conn *grpc.ClientConn
}

func startServer(t *testing.T, cfg Config) *harness {
	t.Helper()
	if cfg.SocketPath == "" {
		cfg.SocketPath = filepath.Join(shortDir(t), "uds", "socket")
	}
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	srv, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		// Dial, not stat: a stale socket may sit there until Run replaces it.
		if c, err := net.Dial("unix", cfg.SocketPath); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("socket never appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &harness{srv: srv, reg: reg, conn: conn}
}

func (h *harness) stream(t *testing.T) grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse] {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := secretv3.NewSecretDiscoveryServiceClient(h.conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// recv waits for one response, failing after a timeout.
func recv(t *testing.T, s grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) (*discoveryv3.DiscoveryResponse, error) {
	t.Helper()
	type r struct {
		resp *discoveryv3.DiscoveryResponse
		err  error
	}
	ch := make(chan r, 1)
	go func() { resp, err := s.Recv(); ch <- r{resp, err} }()
	select {
	case x := <-ch:
		return x.resp, x.err
	case <-time.After(15 * time.Second):
		t.Fatal("no SDS response within 15s")
		return nil, nil
	}
}

func secrets(t *testing.T, resp *discoveryv3.DiscoveryResponse) map[string]*tlsv3.Secret {
	t.Helper()
	out := map[string]*tlsv3.Secret{}
	for _, a := range resp.GetResources() {
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		out[s.GetName()] = &s
	}
	return out
}

func fileMounted(t *testing.T) (Config, *testca.CA, string) {
	t.Helper()
	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	dir := shortDir(t)
	cfg := Config{
		FileMountedCerts: true,
		CertChainFile:    filepath.Join(dir, "cert-chain.pem"),
		KeyFile:          filepath.Join(dir, "key.pem"),
		RootCertFile:     filepath.Join(dir, "root-cert.pem"),
		FileDebounce:     20 * time.Millisecond,
	}
	writePair(t, ca, cfg.CertChainFile, cfg.KeyFile)
	if err := ca.WriteRoot(cfg.RootCertFile); err != nil {
		t.Fatal(err)
	}
	return cfg, ca, dir
}

func TestStreamACKNACKAndPushOnChange(t *testing.T) {
	cfg, ca, _ := fileMounted(t)
	h := startServer(t, cfg)
	s := h.stream(t)
	if err := s.Send(&discoveryv3.DiscoveryRequest{TypeUrl: SecretTypeURL, ResourceNames: []string{WorkloadResource, RootResource}}); err != nil {
		t.Fatal(err)
	}
	resp, err := recv(t, s)
	if err != nil {
		t.Fatal(err)
	}
	got := secrets(t, resp)
	if got[WorkloadResource].GetTlsCertificate() == nil || got[RootResource].GetValidationContext() == nil {
		t.Fatalf("first response %v, want default (tls_certificate) and ROOTCA (validation_context)", got)
	}
	if resp.GetTypeUrl() != SecretTypeURL || resp.GetNonce() == "" || resp.GetVersionInfo() == "" {
		t.Errorf("response header: type %q nonce %q version %q", resp.GetTypeUrl(), resp.GetNonce(), resp.GetVersionInfo())
	}
	if !certs.SameBytes(got[RootResource].GetValidationContext().GetTrustedCa().GetInlineBytes(), ca.RootPEM()) {
		t.Error("ROOTCA is not the root file")
	}
	// ACK, then a NACK carrying the same nonce: neither is answered.
	ack := &discoveryv3.DiscoveryRequest{TypeUrl: SecretTypeURL, ResourceNames: []string{WorkloadResource, RootResource}, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
	nack := &discoveryv3.DiscoveryRequest{TypeUrl: SecretTypeURL, ResourceNames: []string{WorkloadResource, RootResource}, ResponseNonce: resp.GetNonce(), ErrorDetail: &status.Status{Message: "bad secret"}}
	stale := &discoveryv3.DiscoveryRequest{TypeUrl: SecretTypeURL, ResourceNames: []string{WorkloadResource, RootResource, "file-root:/nonexistent"}, ResponseNonce: "stale"}
	for _, r := range []*discoveryv3.DiscoveryRequest{ack, nack, stale} {
		if err := s.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	// Only a change on disk produces the next response, with only default.
	time.Sleep(100 * time.Millisecond)
	newChain, _ := writePair(t, ca, cfg.CertChainFile, cfg.KeyFile)
	resp2, err := recv(t, s)
	if err != nil {
		t.Fatal(err)
	}
	got2 := secrets(t, resp2)
	if len(got2) != 1 || !certs.SameBytes(got2[WorkloadResource].GetTlsCertificate().GetCertificateChain().GetInlineBytes(), newChain) {
		t.Fatalf("after the files changed got %d secrets, want only the new default", len(got2))
	}
	if resp2.GetNonce() == resp.GetNonce() || resp2.GetVersionInfo() == resp.GetVersionInfo() {
		t.Error("push reused nonce or version")
	}
	if n := metricValue(t, h.reg, "istio_agent_sds_nacks_total"); n != 1 {
		t.Errorf("nacks metric = %v, want 1", n)
	}
	if e := metricValue(t, h.reg, "istio_agent_cert_expiry_seconds"); e < 3000 || e > 3600 {
		t.Errorf("cert expiry metric = %v, want about an hour", e)
	}
}

func TestStreamErrors(t *testing.T) {
	cfg, ca, dir := fileMounted(t)
	h := startServer(t, cfg)
	mismatchCert, mismatchKey := filepath.Join(dir, "m-cert.pem"), filepath.Join(dir, "m-key.pem")
	writePair(t, ca, mismatchCert, filepath.Join(dir, "unused-key.pem"))
	writePair(t, ca, filepath.Join(dir, "unused-cert.pem"), mismatchKey)
	tests := []struct {
		name     string
		req      *discoveryv3.DiscoveryRequest
		code     codes.Code
		contains []string
	}{
		{"wrong type", &discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster", ResourceNames: []string{"default"}}, codes.InvalidArgument, []string{"Cluster"}},
		{"unknown name", &discoveryv3.DiscoveryRequest{ResourceNames: []string{"kubernetes://foo"}}, codes.FailedPrecondition, []string{"unknown SDS resource", "kubernetes://foo"}},
		{"bad file-cert name", &discoveryv3.DiscoveryRequest{ResourceNames: []string{"file-cert:/only-cert"}}, codes.FailedPrecondition, []string{"file-cert:<cert path>~<key path>"}},
		{"missing root file", &discoveryv3.DiscoveryRequest{ResourceNames: []string{"file-root:/nonexistent/root.pem"}}, codes.FailedPrecondition, []string{"/nonexistent/root.pem"}},
		{"mismatched key", &discoveryv3.DiscoveryRequest{ResourceNames: []string{FileCertPrefix + mismatchCert + "~" + mismatchKey}}, codes.FailedPrecondition, []string{mismatchCert, mismatchKey, "does not match"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := h.stream(t)
			if err := s.Send(tc.req); err != nil {
				t.Fatal(err)
			}
			_, err := recv(t, s)
			st, _ := grpcstatus.FromError(err)
			if st.Code() != tc.code {
				t.Fatalf("err = %v, want code %v", err, tc.code)
			}
			for _, c := range tc.contains {
				if !strings.Contains(st.Message(), c) {
					t.Errorf("message %q does not mention %q", st.Message(), c)
				}
			}
		})
	}
	if n := metricValue(t, h.reg, "istio_agent_num_file_secret_failures_total"); n < 2 {
		t.Errorf("file secret failures = %v, want at least 2", n)
	}
	_, err := secretv3.NewSecretDiscoveryServiceClient(h.conn).FetchSecrets(context.Background(), &discoveryv3.DiscoveryRequest{})
	if grpcstatus.Code(err) != codes.Unimplemented {
		t.Errorf("FetchSecrets: %v, want Unimplemented", err)
	}
	ds, err := secretv3.NewSecretDiscoveryServiceClient(h.conn).DeltaSecrets(context.Background())
	if err == nil {
		_, err = ds.Recv()
	}
	if grpcstatus.Code(err) != codes.Unimplemented {
		t.Errorf("DeltaSecrets: %v, want Unimplemented", err)
	}
}

func TestSocketSetup(t *testing.T) {
	cfg, _, dir := fileMounted(t)

	// A stale socket from a crashed run is replaced.
	cfg.SocketPath = filepath.Join(dir, "s", "socket")
	if err := os.MkdirAll(filepath.Dir(cfg.SocketPath), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := listenUnix(cfg.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	l.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	l.Close()
	h := startServer(t, cfg)
	fi, err := os.Stat(cfg.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o666 || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket mode %v, want socket 0666", fi.Mode())
	}
	_ = h

	// A live socket belongs to someone else: refuse to steal it.
	if l, err := listenUnix(cfg.SocketPath); err == nil || !strings.Contains(err.Error(), "WORKLOAD_IDENTITY_SOCKET_FILE") {
		if l != nil {
			l.Close()
		}
		t.Errorf("listen on a live socket: %v, want an error naming WORKLOAD_IDENTITY_SOCKET_FILE", err)
	}
	// A regular file is not ours to delete.
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := listenUnix(plain); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("listen on a regular file: %v", err)
	}
}

func TestConfigErrorsNameTheSetting(t *testing.T) {
	tests := []struct {
		cfg  Config
		want []string
	}{
		{Config{}, []string{"CA_ADDR", "POD_NAMESPACE", "SERVICE_ACCOUNT"}},
		{Config{FileMountedCerts: true, GracePeriodRatio: 2}, []string{"SECRET_GRACE_PERIOD_RATIO=2"}},
		{Config{FileMountedCerts: true, SecretTTL: time.Millisecond}, []string{"SECRET_TTL"}},
		{Config{CA: &directCA{}, Namespace: "n", ServiceAccount: "s", Key: certs.KeyOptions{RSAKeySize: 512}}, []string{"WORKLOAD_RSA_KEY_SIZE"}},
	}
	for _, tc := range tests {
		_, err := New(tc.cfg, zaptest.NewLogger(t))
		for _, w := range tc.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("New(%+v) = %v, want an error naming %s", tc.cfg, err, w)
			}
		}
	}
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
		return sum
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

// TestExpiredFileCertRefusedToNewStreams runs on the real clock with a
// certificate valid for one to two seconds (NotAfter has whole seconds). A
// stream that holds it keeps it and gets the replacement; a stream that asks
// after the expiry is refused with the file and the expiry named.
func TestExpiredFileCertRefusedToNewStreams(t *testing.T) {
	cfg, ca, dir := fileMounted(t)
	fc, fk := filepath.Join(dir, "short-cert.pem"), filepath.Join(dir, "short-key.pem")
	chain, _ := writePairTTL(t, ca, fc, fk, 2*time.Second)
	leaf, err := certs.ParseCerts(chain)
	if err != nil {
		t.Fatal(err)
	}
	name := FileCertPrefix + fc + "~" + fk
	req := &discoveryv3.DiscoveryRequest{TypeUrl: SecretTypeURL, ResourceNames: []string{name}}
	h := startServer(t, cfg)

	holder := h.stream(t)
	if err := holder.Send(req); err != nil {
		t.Fatal(err)
	}
	resp, err := recv(t, holder)
	if err != nil {
		t.Fatal(err)
	}
	if len(secrets(t, resp)) != 1 {
		t.Fatalf("first response %v, want the file-cert", resp)
	}
	if err := holder.Send(&discoveryv3.DiscoveryRequest{TypeUrl: SecretTypeURL, ResourceNames: []string{name}, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	before := metricValue(t, h.reg, "istio_agent_num_file_secret_failures_total")

	time.Sleep(time.Until(leaf[0].NotAfter) + 100*time.Millisecond)
	late := h.stream(t)
	if err := late.Send(req); err != nil {
		t.Fatal(err)
	}
	_, err = recv(t, late)
	st, _ := grpcstatus.FromError(err)
	if st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), fc) || !strings.Contains(st.Message(), "expired") {
		t.Fatalf("request after expiry: %v, want FailedPrecondition naming %s and the expiry", err, fc)
	}
	if after := metricValue(t, h.reg, "istio_agent_num_file_secret_failures_total"); after <= before {
		t.Errorf("file secret failures %v -> %v, want the expiry counted", before, after)
	}

	newChain, _ := writePair(t, ca, fc, fk)
	resp2, err := recv(t, holder)
	if err != nil {
		t.Fatal(err)
	}
	got := secrets(t, resp2)[name]
	if !certs.SameBytes(got.GetTlsCertificate().GetCertificateChain().GetInlineBytes(), newChain) {
		t.Fatal("the stream holding the expired certificate did not get the fresh one")
	}
}
