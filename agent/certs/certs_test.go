package certs_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

func TestGenerateKeyFollowsIstioEnv(t *testing.T) {
	tests := []struct {
		name    string
		opts    certs.KeyOptions
		check   func(any) bool
		wantErr string
	}{
		{"empty means RSA 2048", certs.KeyOptions{}, func(k any) bool { r, ok := k.(*rsa.PrivateKey); return ok && r.N.BitLen() == 2048 }, ""},
		{"RSA 3072", certs.KeyOptions{RSAKeySize: 3072}, func(k any) bool { r, ok := k.(*rsa.PrivateKey); return ok && r.N.BitLen() == 3072 }, ""},
		{"ECDSA default curve P256", certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"}, func(k any) bool { e, ok := k.(*ecdsa.PrivateKey); return ok && e.Curve == elliptic.P256() }, ""},
		{"ECDSA P384", certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA", ECCCurve: "P384"}, func(k any) bool { e, ok := k.(*ecdsa.PrivateKey); return ok && e.Curve == elliptic.P384() }, ""},
		{"small RSA", certs.KeyOptions{RSAKeySize: 1024}, nil, "WORKLOAD_RSA_KEY_SIZE"},
		{"bad algorithm", certs.KeyOptions{ECCSignatureAlgorithm: "ED25519"}, nil, "ECC_SIGNATURE_ALGORITHM"},
		{"bad curve", certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA", ECCCurve: "P521"}, nil, "ECC_CURVE"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k, err := certs.GenerateKey(tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(k) {
				t.Errorf("key %T does not match %+v", k, tc.opts)
			}
			for _, pkcs8 := range []bool{false, true} {
				pemKey, err := certs.MarshalKey(k, pkcs8)
				if err != nil {
					t.Fatal(err)
				}
				if pkcs8 != strings.Contains(string(pemKey), "BEGIN PRIVATE KEY") {
					t.Errorf("pkcs8=%v gave %s", pkcs8, strings.SplitN(string(pemKey), "\n", 2)[0])
				}
			}
		})
	}
}

func TestVerifyChain(t *testing.T) {
	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	other, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := certs.GenerateKey(certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"})
	keyPEM, _ := certs.MarshalKey(key, false)
	otherKey, _ := certs.GenerateKey(certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"})
	otherKeyPEM, _ := certs.MarshalKey(otherKey, false)
	id := certs.SPIFFEID("cluster.local", "ns", "sa").String()
	if id != "spiffe://cluster.local/ns/ns/sa/sa" {
		t.Fatalf("SPIFFEID = %s", id)
	}
	// The CSR really carries the identity.
	csrPEM, err := certs.CreateCSR(key, certs.SPIFFEID("cluster.local", "ns", "sa"))
	if err != nil || !strings.Contains(string(csrPEM), "CERTIFICATE REQUEST") {
		t.Fatalf("CreateCSR: %v", err)
	}

	good, _ := ca.Sign(key.Public(), id, time.Hour)
	untrusted, _ := other.Sign(key.Public(), id, time.Hour)
	roots, _, _ := certs.ParseRoots(ca.RootPEM())
	now := time.Now()
	tests := []struct {
		name    string
		chain   []byte
		check   certs.Check
		wantErr string
	}{
		{"good", good, certs.Check{Key: key, Roots: roots, SPIFFEID: id, Now: now}, ""},
		{"good with key PEM", good, certs.Check{KeyPEM: keyPEM, Now: now}, ""},
		{"wrong key", good, certs.Check{Key: otherKey, Now: now}, "does not match the private key"},
		{"wrong key PEM", good, certs.Check{KeyPEM: otherKeyPEM, Now: now}, "private key does not match"},
		{"wrong identity", good, certs.Check{SPIFFEID: "spiffe://cluster.local/ns/x/sa/y", Now: now}, "want spiffe://cluster.local/ns/x/sa/y"},
		{"expired", good, certs.Check{Now: now.Add(2 * time.Hour)}, "expired"},
		{"not yet valid", good, certs.Check{Now: now.Add(-2 * time.Hour)}, "not valid before"},
		{"untrusted", untrusted, certs.Check{Roots: roots, Now: now}, "does not lead to the trusted roots"},
		{"not PEM", []byte("garbage"), certs.Check{}, "no PEM certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := certs.VerifyChain(tc.chain, tc.check)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("VerifyChain: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
	// What passes must be a pair Go's TLS stack (and so Envoy) accepts.
	if _, err := tls.X509KeyPair(good, keyPEM); err != nil {
		t.Errorf("X509KeyPair: %v", err)
	}
}
