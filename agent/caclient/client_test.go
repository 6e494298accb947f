package caclient_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/outrigger-mesh/outrigger/agent/caclient"
	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func csr(t *testing.T) []byte {
	t.Helper()
	k, err := certs.GenerateKey(certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := certs.CreateCSR(k, certs.SPIFFEID("cluster.local", "ns1", "sa1"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func startCA(t *testing.T, cfg testca.Config) *testca.CA {
	t.Helper()
	ca, err := testca.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Stop)
	return ca
}

func TestSignOverTLSWithTokenAndMetadata(t *testing.T) {
	ca := startCA(t, testca.Config{TLS: true, Token: "tok-1"})
	dir := t.TempDir()
	root := filepath.Join(dir, "root-cert.pem")
	tokenFile := filepath.Join(dir, "istio-token")
	if err := ca.WriteRoot(root); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenFile, []byte("tok-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := caclient.New(caclient.Config{
		Address: ca.Addr(), RootCertFile: root, ServerName: "localhost", TokenFile: tokenFile,
		ClusterID: "Kubernetes", CertSigner: "signer-x", Headers: map[string]string{"x-extra": "v"},
	}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	chain, roots, err := c.Sign(context.Background(), csr(t), 3*time.Hour)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if !certs.SameBytes(roots, ca.RootPEM()) {
		t.Errorf("roots = %q, want the CA root", roots)
	}
	pool, _, _ := certs.ParseRoots(roots)
	v, err := certs.VerifyChain(chain, certs.Check{Roots: pool, SPIFFEID: "spiffe://cluster.local/ns/ns1/sa/sa1", Now: time.Now()})
	if err != nil {
		t.Fatalf("chain: %v", err)
	}
	if got := time.Until(v.NotAfter); got < 2*time.Hour || got > 3*time.Hour {
		t.Errorf("lifetime %s, want about 3h", got)
	}
	seen := ca.Seen()[0]
	if seen.Authorization != "Bearer tok-1" || seen.ClusterID != "Kubernetes" || seen.CertSigner != "signer-x" ||
		seen.TTL != 3*time.Hour || strings.Join(seen.Metadata.Get("x-extra"), "") != "v" {
		t.Errorf("CA saw %+v", seen)
	}

	// The token is read for every call: the kubelet rotates it.
	if err := os.WriteFile(tokenFile, []byte("tok-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = c.Sign(context.Background(), csr(t), time.Hour)
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("Sign with a rotated, unknown token: err = %v, want Unauthenticated", err)
	}
	if got := ca.Seen()[1].Authorization; got != "Bearer tok-2" {
		t.Errorf("second call sent %q, want the new token", got)
	}
}

func TestRootFileReadAtHandshake(t *testing.T) {
	ca := startCA(t, testca.Config{TLS: true})
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	c, err := caclient.New(caclient.Config{Address: ca.Addr(), RootCertFile: root, ServerName: "localhost", NoToken: true}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := c.Sign(context.Background(), csr(t), time.Hour); err == nil || !strings.Contains(err.Error(), "CA_ROOT_CA") {
		t.Fatalf("Sign without root file: err = %v, want one naming CA_ROOT_CA", err)
	}
	if err := ca.WriteRoot(root); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, _, err := c.Sign(context.Background(), csr(t), time.Hour)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Sign after the root appeared: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestWrongServerNameRefused(t *testing.T) {
	ca := startCA(t, testca.Config{TLS: true, ServerSANs: []string{"istiod.istio-system.svc"}})
	root := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := ca.WriteRoot(root); err != nil {
		t.Fatal(err)
	}
	c, err := caclient.New(caclient.Config{Address: ca.Addr(), RootCertFile: root, NoToken: true}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := c.Sign(context.Background(), csr(t), time.Hour); err == nil {
		t.Fatal("Sign succeeded against a certificate for another name")
	}
	if n := ca.Issued(); n != 0 {
		t.Errorf("CA issued %d certificates over an unverified connection", n)
	}
}

func TestConfig(t *testing.T) {
	if !(caclient.Config{Address: "istiod:15010"}).Plaintext() || (caclient.Config{Address: "istiod:15012"}).Plaintext() {
		t.Error("Plaintext must be true exactly for port 15010")
	}
	for _, addr := range []string{"", "no-port"} {
		if _, err := caclient.New(caclient.Config{Address: addr}, zaptest.NewLogger(t)); err == nil {
			t.Errorf("New(%q) succeeded", addr)
		}
	}
}

func TestPlaintextOn15010(t *testing.T) {
	ca, err := testca.New(testca.Config{Addr: "127.0.0.1:15010", Token: "t"})
	if err != nil {
		t.Skipf("port 15010 busy: %v", err)
	}
	if err := ca.Start(); err != nil {
		t.Skipf("port 15010 busy: %v", err)
	}
	defer ca.Stop()
	tok := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(tok, []byte("t"), 0o600); err != nil {
		t.Fatal(err)
	}
	// No root file exists: a TLS client could not connect at all.
	c, err := caclient.New(caclient.Config{Address: ca.Addr(), RootCertFile: "/nonexistent", TokenFile: tok}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := c.Sign(context.Background(), csr(t), time.Hour); err != nil {
		t.Fatalf("plaintext Sign: %v", err)
	}
	if got := ca.Seen()[0].Authorization; got != "Bearer t" {
		t.Errorf("token over plaintext = %q, want Bearer t", got)
	}
}
