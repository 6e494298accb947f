package sds_test

import (
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"

	"github.com/outrigger-mesh/outrigger/agent/sds"
	"github.com/outrigger-mesh/outrigger/e2e/envoysim/simtest"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

// These tests run envoysim, the Envoy double, as a process against the
// agent's SDS server: it learns which secrets to fetch from its listeners'
// TLS contexts, as Envoy does, and shows what it holds on /certs.

func serialOf(t *testing.T, pemBytes []byte) string {
	t.Helper()
	b, _ := pem.Decode(pemBytes)
	if b == nil {
		t.Fatal("no PEM certificate")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(c.SerialNumber.Bytes())
}

// leafFor returns the /certs certificate that carries uri, or nil.
func leafFor(certs *adminv3.Certificates, uri string) *adminv3.CertificateDetails {
	for _, c := range certs.GetCertificates() {
		for _, d := range c.GetCertChain() {
			for _, san := range d.GetSubjectAltNames() {
				if san.GetUri() == uri {
					return d
				}
			}
		}
	}
	return nil
}

func startEnvoysim(t *testing.T, socket string, listeners ...string) *simtest.Sim {
	t.Helper()
	return simtest.Start(t, simtest.Bootstrap{NodeID: "sidecar~10.1.0.5~cart-0.shop~shop.svc.cluster.local",
		SDSSocket: socket, Listeners: listeners}.JSON(), simtest.Options{})
}

// envoysim asks for default and ROOTCA, becomes LIVE once both arrived
// from the CA through the agent, shows the workload's SPIFFE ID and the
// mesh root on /certs, and sees each rotation of a short-lived
// certificate without a restart.
func TestEnvoysimIdentityAndRotation(t *testing.T) {
	dir := shortDir(t)
	ca := newCA(t, dir)
	if err := ca.Start(); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "workload-spiffe-uds", "socket")
	start(t, ca, dir, func(c *sds.Config) { c.SecretTTL = 2 * time.Second })
	s := startEnvoysim(t, socket, simtest.MTLSListener("virtualInbound", sds.WorkloadResource, sds.RootResource))
	s.WaitLive(t, 15*time.Second)

	certs := s.Certs(t)
	leaf := leafFor(certs, wantID)
	if leaf == nil {
		t.Fatalf("/certs has no certificate for %s: %v", wantID, certs)
	}
	cas := certs.GetCertificates()[0].GetCaCert()
	if len(cas) != 1 || cas[0].GetSerialNumber() != serialOf(t, ca.RootPEM()) {
		t.Errorf("ca_cert = %v, want the test CA's root", cas)
	}
	if !leaf.GetExpirationTime().AsTime().After(time.Now()) {
		t.Errorf("served certificate already expired at %v", leaf.GetExpirationTime().AsTime())
	}
	st := s.Stats(t, `^sds\.`)
	if st["sds.default.update_success"] < 1 || st["sds.ROOTCA.update_success"] != 1 || st["sds.default.update_rejected"] != 0 {
		t.Errorf("sds stats = %v", st)
	}

	// Renewal at half of the 2 s lifetime: two new certificates, each
	// seen on /certs, and ROOTCA not pushed again.
	seen := map[string]bool{leaf.GetSerialNumber(): true}
	s.Eventually(t, 15*time.Second, "two rotations on /certs", func() bool {
		if l := leafFor(s.Certs(t), wantID); l != nil {
			seen[l.GetSerialNumber()] = true
		}
		return len(seen) >= 3
	})
	if st := s.Stats(t, `^sds\.`); st["sds.ROOTCA.update_success"] != 1 {
		t.Errorf("ROOTCA updates = %d, want 1 (the root did not change)", st["sds.ROOTCA.update_success"])
	}
	if s.State(t) != "LIVE" {
		t.Errorf("state after rotations = %s", s.State(t))
	}
}

// File-mounted certificates (default/ROOTCA with FILE_MOUNTED_CERTS, and
// file-cert:/file-root: resources) replaced on disk the way the kubelet
// swaps a Secret reach envoysim.
func TestEnvoysimFileCertsReplacedOnDisk(t *testing.T) {
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
	crt, k, root := filepath.Join(mount.dir, "tls.crt"), filepath.Join(mount.dir, "tls.key"), filepath.Join(mount.dir, "ca.crt")
	start(t, nil, dir, func(c *sds.Config) {
		c.FileMountedCerts = true
		c.CertChainFile, c.KeyFile, c.RootCertFile = crt, k, root
	})
	fileCert := sds.FileCertPrefix + crt + "~" + k
	fileRoot := sds.FileRootPrefix + root
	s := startEnvoysim(t, filepath.Join(dir, "workload-spiffe-uds", "socket"),
		simtest.MTLSListener("virtualInbound", sds.WorkloadResource, sds.RootResource),
		simtest.MTLSListener("gateway", fileCert, fileRoot))
	s.WaitLive(t, 15*time.Second)

	// leaves returns the serials of both contexts' leaves.
	leaves := func() []string {
		var out []string
		for _, c := range s.Certs(t).GetCertificates() {
			if len(c.GetCertChain()) > 0 {
				out = append(out, c.GetCertChain()[0].GetSerialNumber())
			}
		}
		return out
	}
	want := serialOf(t, chain)
	if got := leaves(); len(got) != 2 || got[0] != want || got[1] != want {
		t.Fatalf("leaf serials = %v, want %s in both contexts", got, want)
	}
	for i := range 2 {
		chain, key = pair(t, ca)
		mount.update(map[string][]byte{"tls.crt": chain, "tls.key": key, "ca.crt": ca.RootPEM()})
		want := serialOf(t, chain)
		s.Eventually(t, 10*time.Second, "the swapped certificate in both contexts", func() bool {
			got := leaves()
			return len(got) == 2 && got[0] == want && got[1] == want
		})
		t.Logf("swap %d reached envoysim", i+1)
	}
	if st := s.Stats(t, `update_rejected`); len(st) != 0 {
		t.Errorf("rejected updates: %v", st)
	}
}
