// Package sds_test runs the agent's identity pipeline end to end: the test
// CA over TLS, the real CA client, the SDS server on a unix socket, and a
// go-control-plane SDS client standing in for Envoy.
package sds_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/outrigger-mesh/outrigger/agent/caclient"
	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/agent/sds"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wantID = "spiffe://cluster.local/ns/shop/sa/cart"

type env struct {
	dir   string
	ca    *testca.CA
	reg   *prometheus.Registry
	logs  *observer.ObservedLogs
	conn  *grpc.ClientConn
	token string // path of the token file
}

func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "sdse2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func logger(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), core)), logs
}

// newCA makes a TLS test CA that wants the token "good".
func newCA(t *testing.T, dir string) *testca.CA {
	t.Helper()
	ca, err := testca.New(testca.Config{TLS: true, Token: "good"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Stop)
	if err := ca.WriteRoot(filepath.Join(dir, "istio-root.pem")); err != nil {
		t.Fatal(err)
	}
	return ca
}

// start runs CA client and SDS server against ca; mutate adjusts the SDS
// config.
func start(t *testing.T, ca *testca.CA, dir string, mutate func(*sds.Config)) *env {
	t.Helper()
	e := &env{dir: dir, ca: ca, reg: prometheus.NewRegistry(), token: filepath.Join(dir, "istio-token")}
	if _, err := os.Stat(e.token); err != nil {
		if err := os.WriteFile(e.token, []byte("good"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	log, logs := logger(t)
	e.logs = logs
	cfg := sds.Config{
		SocketPath:     filepath.Join(dir, "workload-spiffe-uds", "socket"),
		Namespace:      "shop",
		ServiceAccount: "cart",
		Key:            certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"},
		InitialBackoff: 100 * time.Millisecond,
		MaxBackoff:     500 * time.Millisecond,
		FileDebounce:   50 * time.Millisecond,
		Registerer:     e.reg,
	}
	if ca != nil {
		client, err := caclient.New(caclient.Config{
			Address: ca.Addr(), RootCertFile: filepath.Join(dir, "istio-root.pem"), ServerName: "localhost",
			TokenFile: e.token, ClusterID: "Kubernetes",
		}, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { client.Close() })
		cfg.CA = client
	}
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := sds.New(cfg, log)
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
	waitFor(t, 5*time.Second, "SDS socket", func() bool {
		c, err := net.Dial("unix", cfg.SocketPath)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	conn, err := grpc.NewClient("unix://"+cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.conn = conn
	return e
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// envoy is a minimal Envoy SDS subscription: it asks for names, ACKs every
// response and hands the secrets to the test.
type envoy struct {
	t      *testing.T
	stream grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	names  []string
	got    chan map[string]*tlsv3.Secret
	errc   chan error
}

func (e *env) envoy(t *testing.T, names ...string) *envoy {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ev := &envoy{t: t, stream: s, names: names, got: make(chan map[string]*tlsv3.Secret, 16), errc: make(chan error, 1)}
	if err := s.Send(&discoveryv3.DiscoveryRequest{
		Node: nil, TypeUrl: sds.SecretTypeURL, ResourceNames: names,
	}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			resp, err := s.Recv()
			if err != nil {
				ev.errc <- err
				return
			}
			m := map[string]*tlsv3.Secret{}
			for _, a := range resp.GetResources() {
				var sec tlsv3.Secret
				if err := a.UnmarshalTo(&sec); err != nil {
					ev.errc <- err
					return
				}
				m[sec.GetName()] = &sec
			}
			_ = s.Send(&discoveryv3.DiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResourceNames: names, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
			ev.got <- m
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return ev
}

func (ev *envoy) next(d time.Duration) map[string]*tlsv3.Secret {
	ev.t.Helper()
	select {
	case m := <-ev.got:
		return m
	case err := <-ev.errc:
		ev.t.Fatalf("SDS stream ended: %v", err)
	case <-time.After(d):
		ev.t.Fatalf("no SDS push within %s", d)
	}
	return nil
}

// collect waits until every name has been received at least once.
func (ev *envoy) collect(d time.Duration) map[string]*tlsv3.Secret {
	ev.t.Helper()
	all := map[string]*tlsv3.Secret{}
	deadline := time.Now().Add(d)
	for len(all) < len(ev.names) {
		for k, v := range ev.next(time.Until(deadline)) {
			all[k] = v
		}
	}
	return all
}

// checkIdentity verifies what Envoy got: a key that matches its chain, the
// right SPIFFE ID, valid now, chaining to ROOTCA, which is the CA's root.
func checkIdentity(t *testing.T, ca *testca.CA, def, root *tlsv3.Secret) *x509.Certificate {
	t.Helper()
	chain := def.GetTlsCertificate().GetCertificateChain().GetInlineBytes()
	key := def.GetTlsCertificate().GetPrivateKey().GetInlineBytes()
	rootsPEM := root.GetValidationContext().GetTrustedCa().GetInlineBytes()
	if !certs.SameBytes(rootsPEM, ca.RootPEM()) {
		t.Errorf("ROOTCA is not the CA's root")
	}
	pool, _, err := certs.ParseRoots(rootsPEM)
	if err != nil {
		t.Fatal(err)
	}
	v, err := certs.VerifyChain(chain, certs.Check{KeyPEM: key, Roots: pool, SPIFFEID: wantID, Now: time.Now()})
	if err != nil {
		t.Fatalf("Envoy got an unusable identity: %v", err)
	}
	if _, err := tls.X509KeyPair(chain, key); err != nil {
		t.Fatalf("key pair: %v", err)
	}
	return v.Leaf
}

func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			var v float64
			for _, m := range mf.GetMetric() {
				v += m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
			return v
		}
	}
	t.Fatalf("metric %s missing", name)
	return 0
}

func logged(logs *observer.ObservedLogs, substr string) bool {
	for _, e := range logs.All() {
		s := e.Message
		for _, f := range e.Context {
			if f.Type == zapcore.ErrorType {
				s += " " + f.Interface.(error).Error()
			}
		}
		if strings.Contains(s, substr) {
			return true
		}
	}
	return false
}

func TestEnvoyGetsWorkloadIdentity(t *testing.T) {
	dir := shortDir(t)
	ca := newCA(t, dir)
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	// Istio's default key: RSA 2048.
	e := start(t, ca, dir, func(c *sds.Config) { c.Key = certs.KeyOptions{} })
	got := e.envoy(t, sds.WorkloadResource, sds.RootResource).collect(15 * time.Second)
	leaf := checkIdentity(t, ca, got[sds.WorkloadResource], got[sds.RootResource])
	if leaf.PublicKeyAlgorithm != x509.RSA {
		t.Errorf("key algorithm %v, want RSA by default", leaf.PublicKeyAlgorithm)
	}
	if lifetime := leaf.NotAfter.Sub(leaf.NotBefore); lifetime < 23*time.Hour || lifetime > 25*time.Hour {
		t.Errorf("lifetime %s, want SECRET_TTL 24h", lifetime)
	}
	seen := ca.Seen()
	if len(seen) != 1 || seen[0].Authorization != "Bearer good" || seen[0].ClusterID != "Kubernetes" || seen[0].URIs[0] != wantID {
		t.Errorf("CA saw %+v", seen)
	}
	if v := metric(t, e.reg, "istio_agent_num_outgoing_requests"); v != 1 {
		t.Errorf("CSR requests = %v, want 1", v)
	}
	if v := metric(t, e.reg, "istio_agent_cert_expiry_seconds"); v < 23*3600 {
		t.Errorf("cert expiry = %v s, want about 24h", v)
	}
	// A second Envoy stream gets the same certificate, not a new CSR.
	got2 := e.envoy(t, sds.WorkloadResource).collect(5 * time.Second)
	if !certs.SameBytes(got2[sds.WorkloadResource].GetTlsCertificate().GetCertificateChain().GetInlineBytes(),
		got[sds.WorkloadResource].GetTlsCertificate().GetCertificateChain().GetInlineBytes()) || ca.Issued() != 1 {
		t.Errorf("second stream: issued %d, want the cached certificate", ca.Issued())
	}
	// The private key is nowhere on disk.
	key := got[sds.WorkloadResource].GetTlsCertificate().GetPrivateKey().GetInlineBytes()
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if b, _ := os.ReadFile(p); len(b) > 0 && strings.Contains(string(b), strings.TrimSpace(string(key))) {
				t.Errorf("private key found in %s", p)
			}
		}
		return nil
	})
}

func TestRotationReachesEnvoy(t *testing.T) {
	dir := shortDir(t)
	ca := newCA(t, dir)
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	e := start(t, ca, dir, func(c *sds.Config) { c.SecretTTL = 2 * time.Second })
	ev := e.envoy(t, sds.WorkloadResource, sds.RootResource)
	first := ev.collect(15 * time.Second)
	root := first[sds.RootResource]
	prev := checkIdentity(t, ca, first[sds.WorkloadResource], root)
	// Renewal at half the 2s lifetime: two more certificates within a few
	// seconds, each valid when it arrives, and no ROOTCA push (same root).
	for i := range 2 {
		m := ev.next(10 * time.Second)
		if _, ok := m[sds.RootResource]; ok {
			t.Errorf("rotation %d pushed ROOTCA although the root did not change", i+1)
		}
		leaf := checkIdentity(t, ca, m[sds.WorkloadResource], root)
		if leaf.SerialNumber.Cmp(prev.SerialNumber) == 0 {
			t.Fatalf("rotation %d pushed the same certificate", i+1)
		}
		prev = leaf
	}
	if seen := ca.Seen(); seen[0].TTL != 2*time.Second {
		t.Errorf("requested TTL %s, want 2s", seen[0].TTL)
	}
}

func TestCADownAtStartThenBack(t *testing.T) {
	dir := shortDir(t)
	ca := newCA(t, dir) // not started
	e := start(t, ca, dir, nil)
	ev := e.envoy(t, sds.WorkloadResource, sds.RootResource)
	waitFor(t, 10*time.Second, "failed CSRs", func() bool { return metric(t, e.reg, "istio_agent_num_failed_outgoing_requests") >= 2 })
	select {
	case m := <-ev.got:
		t.Fatalf("Envoy got %d secrets while the CA was down", len(m))
	default:
	}
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	got := ev.collect(20 * time.Second)
	checkIdentity(t, ca, got[sds.WorkloadResource], got[sds.RootResource])
}

func TestBadTokenRejectedThenFixed(t *testing.T) {
	dir := shortDir(t)
	ca := newCA(t, dir)
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "istio-token"), []byte("stolen"), 0o600); err != nil {
		t.Fatal(err)
	}
	e := start(t, ca, dir, nil)
	ev := e.envoy(t, sds.WorkloadResource)
	waitFor(t, 10*time.Second, "CA rejections", func() bool {
		return metric(t, e.reg, "istio_agent_num_failed_outgoing_requests") >= 2 && logged(e.logs, "request authenticate failure")
	})
	if ca.Issued() != 0 {
		t.Fatal("CA issued a certificate for a bad token")
	}
	// The kubelet refreshes the token file; the next attempt uses it.
	if err := os.WriteFile(e.token, []byte("good"), 0o600); err != nil {
		t.Fatal(err)
	}
	got := ev.collect(10 * time.Second)
	if got[sds.WorkloadResource].GetTlsCertificate() == nil {
		t.Fatal("no certificate after the token was fixed")
	}
}

func TestCAWrongChainRefused(t *testing.T) {
	dir := shortDir(t)
	ca := newCA(t, dir)
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	ca.SetFault(testca.FaultUntrustedChain)
	e := start(t, ca, dir, nil)
	ev := e.envoy(t, sds.WorkloadResource)
	waitFor(t, 10*time.Second, "refusal logged", func() bool {
		return logged(e.logs, "refusing the certificate from the CA: the certificate chain does not lead to the trusted roots")
	})
	select {
	case <-ev.got:
		t.Fatal("Envoy got a certificate that does not chain to the roots")
	default:
	}
	ca.SetFault(testca.FaultNone)
	ev.collect(10 * time.Second)
}

// k8sMount lays out files the way the kubelet mounts a Secret: each name is
// a symlink into ..data, itself a symlink to a timestamped directory.
type k8sMount struct {
	t   *testing.T
	dir string
	gen int
}

func (m *k8sMount) update(files map[string][]byte) {
	m.t.Helper()
	m.gen++
	ts := filepath.Join(m.dir, "..2026_01_01_00_00_0"+string(rune('0'+m.gen)))
	if err := os.Mkdir(ts, 0o755); err != nil {
		m.t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(ts, name), b, 0o600); err != nil {
			m.t.Fatal(err)
		}
		link := filepath.Join(m.dir, name)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
				m.t.Fatal(err)
			}
		}
	}
	old, _ := os.Readlink(filepath.Join(m.dir, "..data"))
	tmp := filepath.Join(m.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "..data")); err != nil {
		m.t.Fatal(err)
	}
	if old != "" {
		if err := os.RemoveAll(filepath.Join(m.dir, old)); err != nil {
			m.t.Fatal(err)
		}
	}
}

func pair(t *testing.T, ca *testca.CA) (chain, key []byte) {
	t.Helper()
	k, err := certs.GenerateKey(certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"})
	if err != nil {
		t.Fatal(err)
	}
	key, _ = certs.MarshalKey(k, true)
	chain, err = ca.Sign(k.Public(), wantID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return chain, key
}

func TestFileCertsFollowSymlinkSwaps(t *testing.T) {
	dir := shortDir(t)
	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	mount := &k8sMount{t: t, dir: filepath.Join(dir, "certs")}
	if err := os.Mkdir(mount.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	chain, key := pair(t, ca)
	mount.update(map[string][]byte{"tls.crt": chain, "tls.key": key, "ca.crt": ca.RootPEM()})

	e := start(t, nil, dir, func(c *sds.Config) { c.FileMountedCerts = true })
	certName := sds.FileCertPrefix + filepath.Join(mount.dir, "tls.crt") + "~" + filepath.Join(mount.dir, "tls.key")
	rootName := sds.FileRootPrefix + filepath.Join(mount.dir, "ca.crt")
	ev := e.envoy(t, certName, rootName)
	got := ev.collect(10 * time.Second)
	if !certs.SameBytes(got[certName].GetTlsCertificate().GetCertificateChain().GetInlineBytes(), chain) {
		t.Fatal("first push is not the mounted certificate")
	}
	// Two rotations: the second is where watchers on the old target die.
	for i := range 2 {
		chain, key = pair(t, ca)
		mount.update(map[string][]byte{"tls.crt": chain, "tls.key": key, "ca.crt": ca.RootPEM()})
		m := ev.next(10 * time.Second)
		if !certs.SameBytes(m[certName].GetTlsCertificate().GetCertificateChain().GetInlineBytes(), chain) ||
			!certs.SameBytes(m[certName].GetTlsCertificate().GetPrivateKey().GetInlineBytes(), key) {
			t.Fatalf("swap %d: Envoy did not get the new pair", i+1)
		}
		if _, ok := m[rootName]; ok {
			t.Errorf("swap %d: unchanged root pushed again", i+1)
		}
	}
}

func TestFileMountedCertsMismatchRefusedUntilFixed(t *testing.T) {
	dir := shortDir(t)
	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	certsDir := filepath.Join(dir, "etc-certs")
	if err := os.Mkdir(certsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	chainPath, keyPath := filepath.Join(certsDir, "cert-chain.pem"), filepath.Join(certsDir, "key.pem")
	chain, _ := pair(t, ca)
	_, otherKey := pair(t, ca)
	for p, b := range map[string][]byte{chainPath: chain, keyPath: otherKey, filepath.Join(certsDir, "root-cert.pem"): ca.RootPEM()} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e := start(t, nil, dir, func(c *sds.Config) {
		c.FileMountedCerts = true
		c.CertChainFile, c.KeyFile, c.RootCertFile = chainPath, keyPath, filepath.Join(certsDir, "root-cert.pem")
	})
	ev := e.envoy(t, sds.WorkloadResource, sds.RootResource)
	m := ev.next(10 * time.Second)
	if _, ok := m[sds.WorkloadResource]; ok {
		t.Fatal("mismatched key and certificate served")
	}
	if !logged(e.logs, "refusing certificate "+chainPath+" with key "+keyPath) {
		t.Error("no error naming the certificate and key files")
	}
	// Fixing the files on disk brings default to Envoy.
	chain, key := pair(t, ca)
	if err := os.WriteFile(chainPath, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, key, 0o600); err != nil {
		t.Fatal(err)
	}
	m = ev.next(10 * time.Second)
	if !certs.SameBytes(m[sds.WorkloadResource].GetTlsCertificate().GetCertificateChain().GetInlineBytes(), chain) {
		t.Fatal("fixed files not pushed")
	}
}
