package bootstrap

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const hcmAny = `{"@type":"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",` +
	`"stat_prefix":%s,"route_config":{"name":"r"},"http_filters":[{"name":"envoy.filters.http.router","typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}`

func cluster(extra string) string {
	return `{"static_resources":{"clusters":[{"name":"c","type":"STATIC","connect_timeout":"1s"` + extra + `}]}}`
}

func TestValidateErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		doc    string
		format string
		want   []string // substrings of the error; the first is path: problem
	}{
		{name: "unknown field", doc: cluster(`,"conect_timeout":"1s"`),
			want: []string{`static_resources.clusters[0].conect_timeout: unknown field in envoy.config.cluster.v3.Cluster`}},
		{name: "unknown top-level field", doc: `{"statz_config":{}}`,
			want: []string{`statz_config: unknown field in envoy.config.bootstrap.v3.Bootstrap`}},
		{name: "bad enum", doc: cluster(`,"lb_policy":"ROUNDROBIN"`),
			want: []string{`static_resources.clusters[0].lb_policy: "ROUNDROBIN" is not a valid envoy.config.cluster.v3.Cluster.LbPolicy`, "ROUND_ROBIN"}},
		{name: "wrong type", doc: `{"admin":{"address":{"socket_address":{"address":"127.0.0.1","port_value":"fifteen"}}}}`,
			want: []string{`admin.address.socket_address.port_value: "fifteen" is not an integer`}},
		{name: "bad duration", doc: `{"static_resources":{"clusters":[{"name":"c","connect_timeout":"1 second"}]}}`,
			want: []string{`static_resources.clusters[0].connect_timeout: "1 second" is not a duration`}},
		{name: "unresolvable type", doc: `{"admin":{"access_log":[{"name":"x","typed_config":{"@type":"type.googleapis.com/envoy.extensions.access_loggers.nope.v3.Nope"}}]}}`,
			want: []string{`admin.access_log[0].typed_config.@type: "type.googleapis.com/envoy.extensions.access_loggers.nope.v3.Nope" is not a type this build knows`}},
		{name: "unknown field inside Any", doc: `{"admin":{"access_log":[{"name":"x","typed_config":{"@type":"type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog","pth":"/dev/null"}}]}}`,
			want: []string{`admin.access_log[0].typed_config.pth: unknown field in envoy.extensions.access_loggers.file.v3.FileAccessLog`}},
		{name: "constraint at top level", doc: cluster(`,"per_connection_buffer_limit_bytes":1,"dns_refresh_rate":"0.0001s"`),
			want: []string{`static_resources.clusters[0].dns_refresh_rate: value must be greater than 1ms`}},
		{name: "constraint inside Any", doc: `{"static_resources":{"listeners":[{"name":"l","address":{"socket_address":{"address":"0.0.0.0","port_value":1}},` +
			`"filter_chains":[{"filters":[{"name":"hcm","typed_config":` + strings.Replace(hcmAny, "%s", `""`, 1) + `}]}]}]}}`,
			want: []string{`static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefix: value length must be at least 1 runes`}},
		{name: "constraint inside Any in a map", doc: cluster(`,"typed_extension_protocol_options":{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions":` +
			`{"@type":"type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions","explicit_http_config":{"http2_protocol_options":{"max_concurrent_streams":0}}}}`),
			want: []string{`static_resources.clusters[0].typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].explicit_http_config.http2_protocol_options.max_concurrent_streams: value must be inside range [1, 2147483647]`}},
		{name: "TypedStruct value unknown field", doc: `{"bootstrap_extensions":[{"name":"envoy.bootstrap.internal_listener","typed_config":{"@type":"type.googleapis.com/udpa.type.v1.TypedStruct",` +
			`"type_url":"type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener","value":{"buffer_size_kbb":64}}}]}`,
			want: []string{`bootstrap_extensions[0].typed_config.value.buffer_size_kbb: unknown field in envoy.extensions.bootstrap.internal_listener.v3.InternalListener`}},
		{name: "TypedStruct value constraint", doc: `{"bootstrap_extensions":[{"name":"envoy.bootstrap.internal_listener","typed_config":{"@type":"type.googleapis.com/xds.type.v3.TypedStruct",` +
			`"type_url":"type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener","value":{"buffer_size_kb":0}}}]}`,
			want: []string{`bootstrap_extensions[0].typed_config.value.buffer_size_kb: value must be inside range [1, 8192]`}},
		{name: "oneof set twice", doc: `{"static_resources":{"clusters":[{"name":"c","type":"STATIC","cluster_type":{"name":"x"}}]}}`,
			want: []string{`static_resources.clusters[0]`, `only one of cluster_type and type may be set`}},
		{name: "yaml with path", format: "yaml", doc: "admin:\n  address:\n    socket_address: {address: 127.0.0.1, port_value: 15000, protocl: TCP}\n",
			want: []string{`admin.address.socket_address.protocl: unknown field`}},
		{name: "not json", doc: `{"admin":`, want: []string{`not valid JSON`}},
		{name: "list expected", doc: `{"static_resources":{"clusters":{"name":"c"}}}`,
			want: []string{`static_resources.clusters: {"name":"c"} is not a list`}},
		{name: "several errors reported together", doc: `{"a":1,"b":2}`, want: []string{"a: unknown field", "b: unknown field"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			format := tc.format
			if format == "" {
				format = "json"
			}
			err := Validate([]byte(tc.doc), format)
			if err == nil {
				t.Fatalf("Validate accepted %s", tc.doc)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n  %v\nwant it to contain\n  %s", err, w)
				}
			}
		})
	}
}

func TestValidateAccepts(t *testing.T) {
	for _, doc := range []string{
		`{}`,
		cluster(`,"lb_policy":1,"per_connection_buffer_limit_bytes":"1024"`), // enum number, quoted int
		// A TypedStruct for a type this build does not know (Istio's own
		// extensions) is left to Envoy.
		`{"bootstrap_extensions":[{"name":"md","typed_config":{"@type":"type.googleapis.com/udpa.type.v1.TypedStruct","type_url":"type.googleapis.com/istio.workload.BootstrapExtension","value":{"config_source":{"ads":{}}}}}]}`,
		`{"node":{"metadata":{"ANY":{"thing":[1,"x",null]}}},"layered_runtime":{"layers":[{"name":"a","static_layer":{"k":true}}]}}`,
	} {
		if err := Validate([]byte(doc), "json"); err != nil {
			t.Errorf("Validate(%s) = %v", doc, err)
		}
	}
	if err := Validate([]byte("{}"), "toml"); err == nil {
		t.Error("unknown format accepted")
	}
}

// Istio's own packaged template, rendered the way Istio would, must pass:
// users copy it for custom templates.
func TestValidateIstioStyleTemplate(t *testing.T) {
	p := goldenPods["sidecar-default"].params(t)
	data, err := Render(istioStyleTemplate, "t.json", p)
	if err != nil {
		t.Fatal(err)
	}
	if err := Validate(data, "json"); err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
}

func FuzzValidate(f *testing.F) {
	for _, name := range []string{"sidecar-default", "custom"} {
		b, err := os.ReadFile(filepath.Join("testdata", name+".golden"))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"static_resources":{"clusters":[{"name":"c","typed_extension_protocol_options":{"x":{"@type":"type.googleapis.com/udpa.type.v1.TypedStruct","type_url":"type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions","value":{"a":1}}}}]}}`))
	f.Add([]byte(`{"admin":{"access_log":[{"typed_config":{"@type":"type.googleapis.com/google.protobuf.Duration","value":"1s"}}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Must never panic; whatever it accepts must also decode with protojson.
		if Validate(data, "json") == nil {
			if _, err := parse(data, "json"); err != nil {
				t.Fatalf("accepted then rejected: %v", err)
			}
		}
		_ = Validate(data, "yaml")
	})
}
