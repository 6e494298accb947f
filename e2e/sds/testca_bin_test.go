package sds_test

import (
	"bufio"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/outrigger-mesh/outrigger/agent/caclient"
	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// TestTestCABinary runs cmd/testca as a process and signs through it, so the
// command stays usable for manual runs against the agent.
func TestTestCABinary(t *testing.T) {
	bin := testenv.Build(t, "./e2e/testca/cmd/testca")
	dir := shortDir(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	root := filepath.Join(dir, "root.pem")
	cmd := exec.Command(bin, "-addr", addr, "-token", "tk", "-root-out", root, "-roots-apart")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Signal(os.Interrupt); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(line, "listening on "+addr) {
		t.Fatalf("testca said %q, %v", line, err)
	}
	tok := filepath.Join(dir, "tok")
	if err := os.WriteFile(tok, []byte("tk"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := caclient.New(caclient.Config{Address: addr, RootCertFile: root, TokenFile: tok, ServerName: "istiod.istio-system.svc"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k, _ := certs.GenerateKey(certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"})
	csr, _ := certs.CreateCSR(k, certs.SPIFFEID("cluster.local", "shop", "cart"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	chain, roots, err := c.Sign(ctx, csr, time.Hour)
	if err != nil {
		t.Fatalf("Sign via the testca binary: %v", err)
	}
	pool, _, _ := certs.ParseRoots(roots)
	if _, err := certs.VerifyChain(chain, certs.Check{Key: k, Roots: pool, SPIFFEID: wantID, Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
}
