package main

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// FuzzParseSecret feeds arbitrary PEM data to the SDS response check: it
// must refuse or accept, never panic, and never accept a certificate
// without a matching key.
func FuzzParseSecret(f *testing.F) {
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), []byte("junk"), false)
	f.Add([]byte(""), []byte(""), true)
	f.Fuzz(func(t *testing.T, cert, key []byte, validation bool) {
		sec := &tlsv3.Secret{Name: "default"}
		if validation {
			sec.Type = &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: cert}}}}
		} else {
			sec.Type = &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: cert}},
				PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: key}}}}
		}
		a, err := anypb.New(sec)
		if err != nil {
			t.Fatal(err)
		}
		h, err := parseSecretResponse(&discoveryv3.DiscoveryResponse{TypeUrl: secretType, Resources: []*anypb.Any{a}}, "default")
		if err == nil && !validation && (h.keyPair == nil || len(h.chain) == 0) {
			t.Fatal("accepted a certificate secret without a key pair")
		}
	})
}
