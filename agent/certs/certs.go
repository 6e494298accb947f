// Package certs holds the X.509 work behind workload identity: generating the
// workload key and CSR, and checking what comes back (from the CA or from
// mounted files) before it is handed to Envoy.
package certs

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"
)

// KeyOptions selects the workload key, with Istio's env semantics: an empty
// ECCSignatureAlgorithm means RSA.
type KeyOptions struct {
	// ECCSignatureAlgorithm is "" (RSA) or "ECDSA". Istio:
	// ECC_SIGNATURE_ALGORITHM.
	ECCSignatureAlgorithm string
	// ECCCurve is "P256" (default) or "P384". Istio: ECC_CURVE.
	ECCCurve string
	// RSAKeySize is the RSA modulus size, at least 2048. Default 2048.
	// Istio: WORKLOAD_RSA_KEY_SIZE.
	RSAKeySize int
	// PKCS8 encodes the private key as PKCS#8 ("PRIVATE KEY") rather than
	// SEC1/PKCS#1. Istio: PKCS8_KEY.
	PKCS8 bool
}

// Validate reports a configuration error naming the env var at fault.
func (o KeyOptions) Validate() error {
	switch o.ECCSignatureAlgorithm {
	case "":
		if o.RSAKeySize != 0 && o.RSAKeySize < 2048 {
			return fmt.Errorf("WORKLOAD_RSA_KEY_SIZE=%d is below the minimum 2048", o.RSAKeySize)
		}
	case "ECDSA":
		switch o.ECCCurve {
		case "", "P256", "P384":
		default:
			return fmt.Errorf("ECC_CURVE=%q is not supported; use P256 or P384", o.ECCCurve)
		}
	default:
		return fmt.Errorf("ECC_SIGNATURE_ALGORITHM=%q is not supported; use ECDSA or leave it empty for RSA", o.ECCSignatureAlgorithm)
	}
	return nil
}

// GenerateKey makes a fresh private key as o says.
func GenerateKey(o KeyOptions) (crypto.Signer, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.ECCSignatureAlgorithm == "ECDSA" {
		curve := elliptic.P256()
		if o.ECCCurve == "P384" {
			curve = elliptic.P384()
		}
		return ecdsa.GenerateKey(curve, rand.Reader)
	}
	size := o.RSAKeySize
	if size == 0 {
		size = 2048
	}
	return rsa.GenerateKey(rand.Reader, size)
}

// MarshalKey encodes key as PEM.
func MarshalKey(key crypto.Signer, pkcs8 bool) ([]byte, error) {
	if pkcs8 {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, fmt.Errorf("encode private key: %w", err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			return nil, fmt.Errorf("encode private key: %w", err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
	case *rsa.PrivateKey:
		return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}), nil
	}
	return nil, fmt.Errorf("unsupported key type %T", key)
}

// SPIFFEID is spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
func SPIFFEID(trustDomain, namespace, serviceAccount string) *url.URL {
	return &url.URL{Scheme: "spiffe", Host: trustDomain, Path: "/ns/" + namespace + "/sa/" + serviceAccount}
}

// CreateCSR makes a PEM CSR for key whose only SAN is the URI id.
func CreateCSR(key crypto.Signer, id *url.URL) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id}}, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR for %s: %w", id, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ParseCerts reads every CERTIFICATE block of a PEM bundle. It fails when
// there is none or one does not parse.
func ParseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return out, nil
}

// ParseRoots reads a PEM trust bundle into a pool. Certificates that do not
// parse are skipped (RFC 5280 asks for graceful handling of, e.g., negative
// serials), but at least one must.
func ParseRoots(b []byte) (*x509.CertPool, int, error) {
	pool := x509.NewCertPool()
	n := 0
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			continue
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, 0, errors.New("no usable PEM certificate found")
	}
	return pool, n, nil
}

// Check is what VerifyChain demands of a chain.
type Check struct {
	// Key, when set, must be the leaf's private key.
	Key crypto.Signer
	// KeyPEM, when set instead of Key, is parsed and must match the leaf.
	KeyPEM []byte
	// Roots, when set, must anchor the chain.
	Roots *x509.CertPool
	// SPIFFEID, when set, must be one of the leaf's URI SANs.
	SPIFFEID string
	// Now is the verification time.
	Now time.Time
}

// Verified describes a chain that passed VerifyChain.
type Verified struct {
	Leaf      *x509.Certificate
	NotBefore time.Time
	NotAfter  time.Time
}

// VerifyChain checks a PEM chain (leaf first) against c. Errors say what is
// wrong in words a user can act on; callers add which file or CA it came from.
func VerifyChain(chainPEM []byte, c Check) (*Verified, error) {
	chain, err := ParseCerts(chainPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate chain: %w", err)
	}
	leaf := chain[0]
	switch {
	case c.Key != nil:
		if !publicKeysEqual(leaf.PublicKey, c.Key.Public()) {
			return nil, errors.New("the leaf certificate does not match the private key")
		}
	case c.KeyPEM != nil:
		// tls.X509KeyPair parses every key format Envoy accepts and checks
		// the pair.
		if _, err := tls.X509KeyPair(chainPEM, c.KeyPEM); err != nil {
			return nil, fmt.Errorf("the private key does not match the leaf certificate: %w", err)
		}
	}
	if !c.Now.IsZero() {
		if c.Now.After(leaf.NotAfter) {
			return nil, fmt.Errorf("the leaf certificate expired at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		if c.Now.Before(leaf.NotBefore) {
			return nil, fmt.Errorf("the leaf certificate is not valid before %s", leaf.NotBefore.UTC().Format(time.RFC3339))
		}
	}
	if c.SPIFFEID != "" {
		found := false
		for _, u := range leaf.URIs {
			if u.String() == c.SPIFFEID {
				found = true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("the leaf certificate is for %v, want %s", leaf.URIs, c.SPIFFEID)
		}
	}
	if c.Roots != nil {
		inter := x509.NewCertPool()
		for _, ic := range chain[1:] {
			inter.AddCert(ic)
		}
		opts := x509.VerifyOptions{
			Roots:         c.Roots,
			Intermediates: inter,
			CurrentTime:   c.Now,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		}
		if _, err := leaf.Verify(opts); err != nil {
			return nil, fmt.Errorf("the certificate chain does not lead to the trusted roots: %w", err)
		}
	}
	return &Verified{Leaf: leaf, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	ea, ok := a.(equaler)
	return ok && ea.Equal(b)
}

// SameBytes reports whether two PEM payloads are identical, ignoring
// surrounding whitespace.
func SameBytes(a, b []byte) bool { return bytes.Equal(bytes.TrimSpace(a), bytes.TrimSpace(b)) }
