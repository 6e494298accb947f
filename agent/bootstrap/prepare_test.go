package bootstrap

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func readTestdata(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

var istioStyleTemplate = func() string {
	b, err := os.ReadFile(filepath.Join("testdata", "istio-style.json.tmpl"))
	if err != nil {
		return err.Error()
	}
	return string(b)
}()

func put(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPrepareBuiltin(t *testing.T) {
	root := t.TempDir()
	p := goldenPods["sidecar-default"].params(t)
	p.Root = root
	res, err := Prepare(p)
	if err != nil {
		t.Fatal(err)
	}
	wantPath := filepath.Join(root, "etc/istio/proxy/envoy-rev.json")
	if res.ConfigPath != wantPath || !res.Generated || res.ConfigYAML != "" {
		t.Errorf("Prepare() = %+v, want ConfigPath %s, Generated", res, wantPath)
	}
	got, err := os.ReadFile(res.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	want := readTestdata(t, "sidecar-default.golden")
	if diff := cmp.Diff(want, string(got)); diff != "" {
		t.Errorf("written bootstrap (-want +got):\n%s", diff)
	}
	// No temp files left behind by the atomic write.
	entries, _ := os.ReadDir(filepath.Dir(res.ConfigPath))
	if len(entries) != 1 {
		t.Errorf("config dir holds %d entries, want only envoy-rev.json", len(entries))
	}
}

func TestPrepareTemplates(t *testing.T) {
	root := t.TempDir()
	put(t, root, "tmpl/istio.json", istioStyleTemplate)
	put(t, root, "tmpl/env.yaml.tmpl", "node:\n  id: {{ .nodeID }}\n  cluster: from-env-{{ .xds_type }}\nadmin:\n  address:\n    socket_address: {address: {{ .localhost }}, port_value: {{ .config.ProxyAdminPort }}}\n")

	p := goldenPods["custom"].params(t)
	p.Root = root
	p.Proxy.ProxyBootstrapTemplatePath = "tmpl/istio.json"
	res, err := Prepare(p)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(res.ConfigPath)
	var doc map[string]any
	if err := json.Unmarshal(got, &doc); err != nil {
		t.Fatalf("rendered template is not JSON: %v", err)
	}
	for _, want := range []string{`"port_value": 15100`, `"path": "/etc/envoy/XDS"`, `"regex": ".*circuit_breakers.*"`,
		`"histogram_bucket_settings": [{"buckets":[1,5,10],"match":{"prefix":"cluster_manager"}}`, `"tag_name": "upstream_peer"`} {
		if !strings.Contains(string(got), want) {
			t.Errorf("rendered template lacks %s", want)
		}
	}

	// ISTIO_BOOTSTRAP wins over proxyBootstrapTemplatePath; a YAML template
	// gives envoy-rev.yaml.
	p.TemplateEnv = "tmpl/env.yaml.tmpl"
	res, err = Prepare(p)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(res.ConfigPath) != "envoy-rev.yaml" {
		t.Errorf("ConfigPath = %s, want envoy-rev.yaml", res.ConfigPath)
	}
	got, _ = os.ReadFile(res.ConfigPath)
	if !strings.Contains(string(got), "cluster: from-env-DELTA_GRPC") {
		t.Errorf("ISTIO_BOOTSTRAP template not used:\n%s", got)
	}
}

func TestPrepareErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files map[string]string
		set   func(*Params)
		want  []string
	}{
		{name: "template renders an invalid bootstrap",
			files: map[string]string{"t.json": `{"admin":{"adress":{}}}`},
			set:   func(p *Params) { p.Proxy.ProxyBootstrapTemplatePath = "t.json" },
			want:  []string{"bootstrap envoy-rev.json: admin.adress: unknown field in envoy.config.bootstrap.v3.Admin"}},
		{name: "template syntax error",
			files: map[string]string{"t.json": `{"node": {{ .nodeID }`},
			set:   func(p *Params) { p.TemplateEnv = "t.json" },
			want:  []string{"bootstrap template t.json (ISTIO_BOOTSTRAP)", "t.json:1"}},
		{name: "template missing",
			set:  func(p *Params) { p.Proxy.ProxyBootstrapTemplatePath = "nope.json" },
			want: []string{"bootstrap template (proxyBootstrapTemplatePath/--templateFile)", "nope.json"}},
		{name: "custom config file invalid",
			files: map[string]string{"envoy.yaml": "static_resources:\n  clusters:\n  - name: a\n    lb_policy: RANDOMLY\n"},
			set:   func(p *Params) { p.Proxy.CustomConfigFile = "envoy.yaml" },
			want:  []string{`bootstrap envoy.yaml: static_resources.clusters[0].lb_policy: "RANDOMLY" is not a valid`}},
		{name: "override unknown field",
			files: map[string]string{"o.yaml": "admin:\n  adress: {}\n"},
			set:   func(p *Params) { p.OverrideFile = "o.yaml" },
			want:  []string{"bootstrap o.yaml: admin.adress: unknown field"}},
		{name: "override breaks a constraint once merged",
			files: map[string]string{"o.yaml": "static_resources:\n  clusters:\n  - name: extra\n    connect_timeout: 0s\n"},
			set:   func(p *Params) { p.OverrideFile = "o.yaml" },
			want:  []string{"ISTIO_BOOTSTRAP_OVERRIDE o.yaml merged over the bootstrap", "static_resources.clusters[4].connect_timeout: value must be greater than 0s"}},
		{name: "bad connection cap",
			set: func(p *Params) {
				p.Proxy.ProxyMetadata = map[string]string{"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "lots"}
			},
			want: []string{`ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS: "lots" is not a positive integer`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for name, content := range tc.files {
				put(t, root, name, content)
			}
			p := goldenPods["sidecar-default"].params(t)
			p.Root = root
			tc.set(&p)
			_, err := Prepare(p)
			if err == nil {
				t.Fatal("Prepare succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n  %v\nwant it to contain\n  %s", err, w)
				}
			}
			// Nothing is written for Envoy to trip over.
			if _, err := os.Stat(filepath.Join(root, "etc/istio/proxy/envoy-rev.json")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("bootstrap written despite the error (stat: %v)", err)
			}
		})
	}
}

func TestPrepareCustomConfigAndOverride(t *testing.T) {
	root := t.TempDir()
	custom := readTestdata(t, "router-ipv6.golden")
	put(t, root, "custom/envoy.json", custom)
	put(t, root, "override.yaml", `
static_resources:
  clusters:
  - name: node-agent
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: node-agent
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: $(HOST_IP), port_value: 9999}}}
`)
	p := goldenPods["sidecar-default"].params(t)
	p.Root = root
	p.Proxy.CustomConfigFile = "custom/envoy.json"
	p.OverrideFile = "override.yaml"
	p.HostIP = "10.0.0.2"
	res, err := Prepare(p)
	if err != nil {
		t.Fatal(err)
	}
	if res.Generated || res.ConfigPath != filepath.Join(root, "custom/envoy.json") {
		t.Errorf("customConfigFile: got %+v, want it used as-is", res)
	}
	if got, _ := os.ReadFile(res.ConfigPath); string(got) != custom {
		t.Error("customConfigFile was rewritten")
	}
	var over map[string]any
	if err := json.Unmarshal([]byte(res.ConfigYAML), &over); err != nil {
		t.Fatalf("ConfigYAML is not JSON: %v: %s", err, res.ConfigYAML)
	}
	if !strings.Contains(res.ConfigYAML, `"address":"10.0.0.2"`) {
		t.Errorf("$(HOST_IP) not substituted: %s", res.ConfigYAML)
	}
}

func TestWrite(t *testing.T) {
	p := filepath.Join(t.TempDir(), "a", "b", "envoy-rev.json")
	for _, content := range []string{"one", "two"} {
		if err := Write(p, []byte(content)); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(p); string(got) != content {
			t.Errorf("content = %q, want %q", got, content)
		}
	}
	if err := Write(filepath.Join(p, "under-a-file"), nil); err == nil {
		t.Error("Write under a regular file succeeded")
	}
}

func BenchmarkGenerateValidate(b *testing.B) {
	p := goldenPods["sidecar-default"].params(b)
	b.ReportAllocs()
	for b.Loop() {
		data, format, err := Generate(p)
		if err != nil {
			b.Fatal(err)
		}
		if err := Validate(data, format); err != nil {
			b.Fatal(err)
		}
	}
}
