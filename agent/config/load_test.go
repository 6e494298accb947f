package config

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func ptr[T any](v T) *T { return &v }

func writeFile(t *testing.T, root, rel, content string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func observed() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	return zap.New(core), logs
}

func TestLoadPrecedence(t *testing.T) {
	root := t.TempDir()
	writeFile(t, root, DefaultMeshConfigFile, `
trustDomain: cluster.local
defaultConfig:
  drainDuration: 30s
  discoveryAddress: mesh:15012
  proxyMetadata: {A: mesh, B: mesh}
  runtimeValues: {x: "1"}
  extraStatTags: [one]
  concurrency: 4
`)
	env := Env{"PROXY_CONFIG": `{"discoveryAddress":"env:15012","proxyMetadata":{"B":"env","C":"env"},"runtime_values":{"y":"2"},"statusPort":"15021","terminationDrainDuration":"7s"}`}
	pod := PodInfo{Annotations: map[string]string{
		ProxyConfigAnnotation: "proxyMetadata:\n  C: anno\nextraStatTags: [two, three]\nconcurrency: \"3\"\n",
		StatusPortAnnotation:  "15099",
	}}
	log, _ := observed()
	got, err := Load(LoadOptions{Root: root, Env: env, Pod: pod}, log)
	if err != nil {
		t.Fatal(err)
	}
	want := Defaults()
	want.DrainDuration = 30 * time.Second
	want.TerminationDrainDuration = 7 * time.Second
	want.DiscoveryAddress = "env:15012"
	want.StatusPort = 15099
	want.ProxyMetadata = map[string]string{"A": "mesh", "B": "env", "C": "anno"} // merged
	want.RuntimeValues = map[string]string{"y": "2"}                             // replaced
	want.ExtraStatTags = []string{"two", "three"}                                // replaced
	want.Concurrency = ptr[int32](3)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Load() mismatch (-want +got):\n%s", diff)
	}
}

func TestLoadDiscoveryAnnotationAndTemplateFlag(t *testing.T) {
	log, _ := observed()
	got, err := Load(LoadOptions{
		Pod:            PodInfo{Annotations: map[string]string{DiscoveryAnnotation: "istiod.other:15012"}},
		TemplateFile:   "/tmpl.json",
		ServiceCluster: "flag-cluster",
		Env:            Env{"PROXY_CONFIG": `serviceCluster: ""`},
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	if got.DiscoveryAddress != "istiod.other:15012" || got.ProxyBootstrapTemplatePath != "/tmpl.json" || got.ServiceCluster != "flag-cluster" {
		t.Errorf("got discovery %q template %q cluster %q", got.DiscoveryAddress, got.ProxyBootstrapTemplatePath, got.ServiceCluster)
	}

	// customConfigFile wins over --templateFile.
	got, err = Load(LoadOptions{TemplateFile: "/tmpl.json", Env: Env{"PROXY_CONFIG": `{"customConfigFile":"/envoy.yaml"}`}}, log)
	if err != nil {
		t.Fatal(err)
	}
	if got.ProxyBootstrapTemplatePath != "" {
		t.Errorf("template path = %q with customConfigFile set", got.ProxyBootstrapTemplatePath)
	}
}

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		env     Env
		mesh    string
		annos   map[string]string
		flagC   int
		wantErr string
	}{
		{name: "bad duration", env: Env{"PROXY_CONFIG": `{"drainDuration":"5 seconds"}`},
			wantErr: `PROXY_CONFIG: field drainDuration: "5 seconds" is not a duration (use e.g. "45s")`},
		{name: "bad port", env: Env{"PROXY_CONFIG": `proxyAdminPort: 70000`},
			wantErr: `PROXY_CONFIG: field proxyAdminPort: 70000 is not a port (use 1-65535)`},
		{name: "bad enum", env: Env{"PROXY_CONFIG": `controlPlaneAuthPolicy: TLS`},
			wantErr: `PROXY_CONFIG: field controlPlaneAuthPolicy: "TLS" is not one of NONE, MUTUAL_TLS`},
		{name: "bad concurrency", annos: map[string]string{ProxyConfigAnnotation: `concurrency: two`},
			wantErr: `annotation proxy.istio.io/config: field concurrency: "two" is not an integer`},
		{name: "not an object", env: Env{"PROXY_CONFIG": `[1,2]`}, wantErr: `PROXY_CONFIG: want a ProxyConfig object`},
		{name: "bad yaml", env: Env{"PROXY_CONFIG": "a: [\n"}, wantErr: `PROXY_CONFIG: not valid YAML or JSON`},
		{name: "mesh file", mesh: "defaultConfig:\n  statusPort: -1\n",
			wantErr: `mesh config ./etc/istio/config/mesh defaultConfig: field statusPort: -1 is not a port`},
		{name: "bad regex", env: Env{"PROXY_CONFIG": `{"proxyStatsMatcher":{"inclusionRegexps":["("]}}`},
			wantErr: `field proxyStatsMatcher: inclusionRegexps: "(" is not a regular expression`},
		{name: "validation", env: Env{"PROXY_CONFIG": `{"discoveryAddress":"istiod","drainDuration":"0s","binaryPath":""}`},
			wantErr: "proxy config: field binaryPath: must not be empty"},
		{name: "validation discovery", env: Env{"PROXY_CONFIG": `{"discoveryAddress":"istiod"}`},
			wantErr: `proxy config: field discoveryAddress: "istiod": not host:port`},
		{name: "status annotation", annos: map[string]string{StatusPortAnnotation: "x"},
			wantErr: `annotation status.sidecar.istio.io/port: "x" is not a port`},
		{name: "cpu limit", env: Env{"ISTIO_CPU_LIMIT": "1.5"}, wantErr: `env ISTIO_CPU_LIMIT: "1.5"`},
		{name: "concurrency flag", flagC: -1, wantErr: `--concurrency -1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if tc.mesh != "" {
				writeFile(t, root, DefaultMeshConfigFile, tc.mesh)
			}
			log, _ := observed()
			_, err := Load(LoadOptions{Root: root, Env: tc.env, Pod: PodInfo{Annotations: tc.annos}, Concurrency: tc.flagC}, log)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Load() error = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestLoadWarnsUnknownFields(t *testing.T) {
	log, logs := observed()
	p, err := Load(LoadOptions{Env: Env{"PROXY_CONFIG": `{"drainDurashun":"5s","image":{"imageType":"distroless"},"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":true},"proxyStatsMatcher":{"inclusionPrefix":["x"]}}`}}, log)
	if err != nil {
		t.Fatal(err)
	}
	var msgs []string
	for _, e := range logs.FilterMessage("ignoring part of the proxy config").All() {
		m := e.ContextMap()
		msgs = append(msgs, m["source"].(string)+" "+m["field"].(string)+": "+m["problem"].(string))
	}
	want := []string{
		"PROXY_CONFIG drainDurashun: unknown ProxyConfig field, ignored",
		`PROXY_CONFIG proxyMetadata: key "ISTIO_META_DNS_CAPTURE": true is not a string, used as "true" (quote it)`,
		`PROXY_CONFIG proxyStatsMatcher: unknown field "inclusionPrefix", ignored`,
	}
	if diff := cmp.Diff(want, msgs); diff != "" {
		t.Errorf("warnings (-want +got):\n%s", diff)
	}
	// Known Istio fields the agent does not use pass through to istiod.
	if got := string(p.Passthrough["image"]); got != `{"imageType":"distroless"}` {
		t.Errorf("passthrough image = %s", got)
	}
	if p.ProxyMetadata["ISTIO_META_DNS_CAPTURE"] != "true" {
		t.Errorf("proxyMetadata = %v", p.ProxyMetadata)
	}
}

func TestConcurrency(t *testing.T) {
	for _, tc := range []struct {
		name     string
		pc       string
		cpu      string
		flag     int
		want     int
		wantWarn bool
	}{
		{name: "unset", want: 0, wantWarn: true},
		{name: "cpu limit", cpu: "3", want: 3},
		{name: "proxyconfig wins over cpu limit", pc: `{"concurrency":2}`, cpu: "3", want: 2},
		{name: "string int", pc: `{"concurrency":"5"}`, want: 5},
		{name: "flag wins", pc: `{"concurrency":2}`, cpu: "3", flag: 6, want: 6},
		{name: "explicit zero", pc: `{"concurrency":0}`, cpu: "3", want: 0, wantWarn: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := Env{"PROXY_CONFIG": tc.pc, "ISTIO_CPU_LIMIT": tc.cpu}
			log, logs := observed()
			p, err := Load(LoadOptions{Env: env, Concurrency: tc.flag}, log)
			if err != nil {
				t.Fatal(err)
			}
			if p.ConcurrencyValue() != tc.want {
				t.Errorf("concurrency = %d, want %d", p.ConcurrencyValue(), tc.want)
			}
			warned := logs.FilterMessageSnippet("concurrency is 0").Len() > 0
			if warned != tc.wantWarn {
				t.Errorf("warned = %v, want %v", warned, tc.wantWarn)
			}
		})
	}
}

func TestMarshalJSONShape(t *testing.T) {
	p := Defaults()
	p.Concurrency = ptr[int32](2)
	p.ProxyMetadata = map[string]string{"ISTIO_META_X": "y"}
	p.DrainDuration = 1500 * time.Millisecond
	p.ControlPlaneAuthPolicy = AuthNone
	p.Tracing = json.RawMessage(`{"zipkin":{"address":"z:9411"}}`)
	got, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"binaryPath":"/usr/local/bin/envoy","concurrency":2,"configPath":"./etc/istio/proxy","discoveryAddress":"istiod.istio-system.svc:15012","drainDuration":"1.500s","proxyAdminPort":15000,"proxyMetadata":{"ISTIO_META_X":"y"},"serviceCluster":"istio-proxy","statNameLength":189,"statusPort":15020,"terminationDrainDuration":"5s","tracing":{"zipkin":{"address":"z:9411"}}}`
	if string(got) != want {
		t.Errorf("MarshalJSON =\n%s\nwant\n%s", got, want)
	}
	// The rendered form parses back to the same config.
	back := Defaults()
	back.ControlPlaneAuthPolicy = AuthNone
	if _, err := overlay(back, "roundtrip", got); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(p, back); diff != "" {
		t.Errorf("roundtrip (-want +got):\n%s", diff)
	}
	if s := p.String(); !strings.Contains(s, "drainDuration: 1.500s") {
		t.Errorf("String() = %s", s)
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"45s": 45 * time.Second, "0.5s": 500 * time.Millisecond, "1.000000001s": time.Second + 1,
		"-2s": -2 * time.Second, "1m30s": 90 * time.Second, "250ms": 250 * time.Millisecond,
	} {
		got, err := ParseDuration(in)
		if err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
		if in[len(in)-1] == 's' && !strings.ContainsAny(in, "m") {
			if back, _ := ParseDuration(FormatDuration(got)); back != got {
				t.Errorf("FormatDuration(%v) = %q does not parse back", got, FormatDuration(got))
			}
		}
	}
	for _, in := range []string{"", "5", "5 seconds", "s", "1h2"} {
		if _, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) succeeded", in)
		}
	}
}
