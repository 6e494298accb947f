package main

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// dumpJSON is Envoy's admin JSON: proto field names, pretty.
var dumpJSON = protojson.MarshalOptions{UseProtoNames: true, Multiline: true, Indent: " "}

// tlsContextNames is one TLS context's secret names.
type tlsContextNames struct{ certs, cas []string }

// tlsContexts lists the distinct TLS contexts (by the SDS secrets they
// name) of every cluster and listener. Envoy lists one /certs entry per
// context; identical contexts are shown once here.
func (s *sim) tlsContexts() []tlsContextNames {
	seen := map[string]bool{}
	var out []tlsContextNames
	visit := func(m proto.Message) {
		walkMessages(m.ProtoReflect(), func(msg proto.Message) {
			ctx, ok := msg.(*tlsv3.CommonTlsContext)
			if !ok {
				return
			}
			var c tlsContextNames
			for _, sc := range ctx.GetTlsCertificateSdsSecretConfigs() {
				c.certs = append(c.certs, sc.GetName())
			}
			if v := ctx.GetValidationContextSdsSecretConfig(); v != nil {
				c.cas = append(c.cas, v.GetName())
			}
			if v := ctx.GetCombinedValidationContext().GetValidationContextSdsSecretConfig(); v != nil {
				c.cas = append(c.cas, v.GetName())
			}
			if len(c.certs)+len(c.cas) == 0 {
				return
			}
			key := strings.Join(c.certs, ",") + "|" + strings.Join(c.cas, ",")
			if !seen[key] {
				seen[key] = true
				out = append(out, c)
			}
		})
	}
	for _, c := range s.allClusters() {
		visit(c)
	}
	for _, l := range s.allListeners() {
		visit(l)
	}
	return out
}

// certDetails is Envoy's CertificateDetails of one certificate. SDS
// secrets are inline, which Envoy shows as path "<inline>".
func certDetails(c *x509.Certificate, now time.Time) *adminv3.CertificateDetails {
	d := &adminv3.CertificateDetails{
		Path:           "<inline>",
		SerialNumber:   hex.EncodeToString(c.SerialNumber.Bytes()),
		ValidFrom:      timestamppb.New(c.NotBefore),
		ExpirationTime: timestamppb.New(c.NotAfter),
	}
	if left := c.NotAfter.Sub(now); left > 0 {
		d.DaysUntilExpiration = uint64(left / (24 * time.Hour))
	}
	for _, u := range c.URIs {
		d.SubjectAltNames = append(d.SubjectAltNames, &adminv3.SubjectAlternateName{Name: &adminv3.SubjectAlternateName_Uri{Uri: u.String()}})
	}
	for _, n := range c.DNSNames {
		d.SubjectAltNames = append(d.SubjectAltNames, &adminv3.SubjectAlternateName{Name: &adminv3.SubjectAlternateName_Dns{Dns: n}})
	}
	for _, ip := range c.IPAddresses {
		d.SubjectAltNames = append(d.SubjectAltNames, &adminv3.SubjectAlternateName{Name: &adminv3.SubjectAlternateName_IpAddress{IpAddress: ip.String()}})
	}
	return d
}

// handleCerts is /certs: per TLS context, the trusted CAs (ca_cert) and
// the certificate chain (cert_chain, leaf first) from the SDS secrets it
// holds. Envoy shows only the first certificate of each; envoysim shows
// all of them.
func (s *sim) handleCerts(w http.ResponseWriter, _ *http.Request) {
	now := time.Now()
	out := &adminv3.Certificates{}
	for _, ctx := range s.tlsContexts() {
		c := &adminv3.Certificate{}
		for _, n := range ctx.cas {
			if h := s.sds.get(n); h != nil {
				for _, cert := range h.roots {
					c.CaCert = append(c.CaCert, certDetails(cert, now))
				}
			}
		}
		for _, n := range ctx.certs {
			if h := s.sds.get(n); h != nil {
				for _, cert := range h.chain {
					c.CertChain = append(c.CertChain, certDetails(cert, now))
				}
			}
		}
		out.Certificates = append(out.Certificates, c)
	}
	writeProto(w, out)
}

func writeProto(w http.ResponseWriter, m proto.Message) {
	b, err := dumpJSON.Marshal(m)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

// redacted returns a copy of a secret without its private key, as
// Envoy's config dump shows it.
func redacted(sec *tlsv3.Secret) *tlsv3.Secret {
	c := proto.Clone(sec).(*tlsv3.Secret)
	if tc := c.GetTlsCertificate(); tc != nil && tc.GetPrivateKey() != nil {
		tc.PrivateKey = &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "[redacted]"}}
	}
	return c
}

func mustAnyOf(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // only messages linked into this binary reach here
	}
	return a
}

// dumpEntries returns the entries of one config_dump resource field, as
// ?resource= selects them.
func (s *sim) dumpEntries(resource string) ([]proto.Message, bool) {
	var out []proto.Message
	switch resource {
	case "dynamic_active_secrets":
		for _, h := range s.sds.held() {
			out = append(out, &adminv3.SecretsConfigDump_DynamicSecret{Name: h.secret.GetName(), VersionInfo: h.version,
				LastUpdated: timestamppb.New(h.updated), Secret: mustAnyOf(redacted(h.secret))})
		}
	case "dynamic_warming_secrets":
		for _, d := range s.wantedSecrets() {
			if s.sds.get(d.name) == nil {
				out = append(out, &adminv3.SecretsConfigDump_DynamicSecret{Name: d.name})
			}
		}
	case "dynamic_active_clusters":
		for _, e := range s.res.list(cdsType) {
			out = append(out, &adminv3.ClustersConfigDump_DynamicCluster{VersionInfo: e.version,
				LastUpdated: timestamppb.New(e.updated), Cluster: mustAnyOf(e.msg)})
		}
	case "static_clusters":
		for _, c := range s.bs.GetStaticResources().GetClusters() {
			out = append(out, &adminv3.ClustersConfigDump_StaticCluster{Cluster: mustAnyOf(c)})
		}
	case "dynamic_listeners":
		for _, e := range s.res.list(ldsType) {
			out = append(out, &adminv3.ListenersConfigDump_DynamicListener{Name: e.name, ActiveState: &adminv3.ListenersConfigDump_DynamicListenerState{
				VersionInfo: e.version, LastUpdated: timestamppb.New(e.updated), Listener: mustAnyOf(e.msg)}})
		}
	case "static_listeners":
		for _, l := range s.bs.GetStaticResources().GetListeners() {
			out = append(out, &adminv3.ListenersConfigDump_StaticListener{Listener: mustAnyOf(l)})
		}
	case "dynamic_route_configs":
		for _, e := range s.res.list(rdsType) {
			out = append(out, &adminv3.RoutesConfigDump_DynamicRouteConfig{VersionInfo: e.version,
				LastUpdated: timestamppb.New(e.updated), RouteConfig: mustAnyOf(e.msg)})
		}
	case "dynamic_endpoint_configs":
		for _, e := range s.res.list(edsType) {
			out = append(out, &adminv3.EndpointsConfigDump_DynamicEndpointConfig{VersionInfo: e.version,
				LastUpdated: timestamppb.New(e.updated), EndpointConfig: mustAnyOf(e.msg)})
		}
	default:
		return nil, false
	}
	return out, true
}

// entriesAs is dumpEntries(resource) as the field's own entry type.
func entriesAs[T proto.Message](s *sim, resource string) []T {
	entries, _ := s.dumpEntries(resource)
	out := make([]T, 0, len(entries))
	for _, m := range entries {
		out = append(out, m.(T))
	}
	return out
}

// handleConfigDump is /config_dump: the bootstrap, clusters, listeners,
// routes, endpoints (with include_eds) and secrets as Envoy's admin
// protos; ?resource=<field> lists the entries of one field.
func (s *sim) handleConfigDump(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var configs []proto.Message
	if res := q.Get("resource"); res != "" {
		entries, ok := s.dumpEntries(res)
		if !ok {
			http.Error(w, fmt.Sprintf("unknown resource field %q", res), http.StatusNotFound)
			return
		}
		configs = entries
	} else {
		clusters := &adminv3.ClustersConfigDump{
			StaticClusters:        entriesAs[*adminv3.ClustersConfigDump_StaticCluster](s, "static_clusters"),
			DynamicActiveClusters: entriesAs[*adminv3.ClustersConfigDump_DynamicCluster](s, "dynamic_active_clusters"),
		}
		listeners := &adminv3.ListenersConfigDump{
			StaticListeners:  entriesAs[*adminv3.ListenersConfigDump_StaticListener](s, "static_listeners"),
			DynamicListeners: entriesAs[*adminv3.ListenersConfigDump_DynamicListener](s, "dynamic_listeners"),
		}
		routes := &adminv3.RoutesConfigDump{
			DynamicRouteConfigs: entriesAs[*adminv3.RoutesConfigDump_DynamicRouteConfig](s, "dynamic_route_configs"),
		}
		secrets := &adminv3.SecretsConfigDump{
			DynamicActiveSecrets:  entriesAs[*adminv3.SecretsConfigDump_DynamicSecret](s, "dynamic_active_secrets"),
			DynamicWarmingSecrets: entriesAs[*adminv3.SecretsConfigDump_DynamicSecret](s, "dynamic_warming_secrets"),
		}
		configs = []proto.Message{&adminv3.BootstrapConfigDump{Bootstrap: s.bs}, clusters, listeners, routes, secrets}
		if _, ok := q["include_eds"]; ok {
			configs = append(configs, &adminv3.EndpointsConfigDump{
				DynamicEndpointConfigs: entriesAs[*adminv3.EndpointsConfigDump_DynamicEndpointConfig](s, "dynamic_endpoint_configs"),
			})
		}
	}
	dump := &adminv3.ConfigDump{}
	for _, m := range configs {
		dump.Configs = append(dump.Configs, mustAnyOf(m))
	}
	writeProto(w, dump)
}

// handleListeners is /listeners: name::address per line, sorted.
func (s *sim) handleListeners(w http.ResponseWriter, _ *http.Request) {
	var buf bytes.Buffer
	for _, l := range s.listeners.list() {
		fmt.Fprintf(&buf, "%s::%s\n", l.name, l.addr)
	}
	_, _ = w.Write(buf.Bytes())
}
