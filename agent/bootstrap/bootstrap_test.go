package bootstrap

import (
	"encoding/json"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/outrigger-mesh/outrigger/agent/config"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func interfaces(addrs ...string) func() ([]config.Interface, error) {
	ifc := config.Interface{Name: "eth0", Up: true}
	for _, a := range addrs {
		ifc.Addrs = append(ifc.Addrs, netip.MustParseAddr(a))
	}
	return func() ([]config.Interface, error) { return []config.Interface{ifc}, nil }
}

// pod describes a test pod the way the injector would start the agent.
type pod struct {
	typ       config.ProxyType
	env       config.Env
	labels    map[string]string
	annos     map[string]string
	ifaceIPs  []string
	flagConc  int
	tweakOpts func(*Options)
}

func (tp pod) params(t testing.TB) Params {
	t.Helper()
	env := config.Env{
		"POD_NAME": "productpage-v1-abc", "POD_NAMESPACE": "bookinfo", "INSTANCE_IP": "10.244.1.7",
		"SERVICE_ACCOUNT": "bookinfo-productpage", "ISTIO_META_CLUSTER_ID": "Kubernetes",
		"ISTIO_META_MESH_ID": "cluster.local", "ISTIO_META_WORKLOAD_NAME": "productpage-v1",
		"ISTIO_META_INTERCEPTION_MODE": "REDIRECT", "ISTIO_META_APP_CONTAINERS": "productpage",
		"PROXY_CONFIG": `{"concurrency":2}`, "HOST_IP": "10.0.0.2",
	}
	for k, v := range tp.env {
		env[k] = v
	}
	podInfo := config.PodInfo{Labels: tp.labels, Annotations: tp.annos}
	pc, err := config.Load(config.LoadOptions{Env: env, Pod: podInfo, Concurrency: tp.flagConc}, nil)
	if err != nil {
		t.Fatal(err)
	}
	env = config.EffectiveEnv(env, pc)
	opts, err := OptionsFromEnv(env)
	if err != nil {
		t.Fatal(err)
	}
	if tp.tweakOpts != nil {
		tp.tweakOpts(&opts)
	}
	ips := tp.ifaceIPs
	if ips == nil {
		ips = []string{"10.244.1.7"}
	}
	typ := tp.typ
	if typ == "" {
		typ = config.Sidecar
	}
	node, err := config.NewNode(config.NodeOptions{
		Type: typ, Env: env, Pod: podInfo, Interfaces: interfaces(ips...), IstioVersion: "1.28.0",
		EnvoyStatusPort: opts.EnvoyStatusPort, EnvoyPrometheusPort: opts.EnvoyPrometheusPort,
		ExitOnZeroActiveConnections: opts.ExitOnZeroActiveConnections,
	}, pc, nil)
	if err != nil {
		t.Fatal(err)
	}
	return Params{Options: opts, Node: node, Proxy: pc}
}

var goldenPods = map[string]pod{
	// The default injected sidecar.
	"sidecar-default": {
		labels: map[string]string{"app": "productpage", "version": "v1", "pod-template-hash": "abc",
			"security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": "productpage"},
		annos: map[string]string{"kubectl.kubernetes.io/default-container": "productpage"},
	},
	// SotW xDS, proxyMetadata, static labels, locality, exit-on-zero drain.
	"sidecar-sotw-metadata": {
		env: config.Env{
			"ISTIO_DELTA_XDS":                 "false",
			"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true",
			"ISTIO_METAJSON_LABELS":           `{"app":"reviews","version":"v2"}`,
			"PROXY_CONFIG":                    `{"concurrency":1,"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true","ISTIO_META_DNS_AUTO_ALLOCATE":"true","DNS_AGENT":""}}`,
		},
		labels: map[string]string{"app": "reviews", "version": "v2", "topology.istio.io/locality": "us-east1.us-east1-b.rack7"},
	},
	// An ingress gateway on an IPv6-only pod.
	"router-ipv6": {
		typ: config.Router,
		env: config.Env{
			"POD_NAME": "istio-ingressgateway-5f7d", "POD_NAMESPACE": "istio-system", "INSTANCE_IP": "fd00:10:244::7",
			"SERVICE_ACCOUNT": "istio-ingressgateway-service-account", "ISTIO_META_ROUTER_MODE": "standard",
			"PROXY_CONFIG": `{}`,
		},
		labels:   map[string]string{"app": "istio-ingressgateway", "istio": "ingressgateway"},
		ifaceIPs: []string{"fd00:10:244::7"},
	},
	// Custom ports, stats matchers (ProxyConfig and annotations), runtime
	// values, connection cap, JSON logs, outlier log, dual stack.
	"custom": {
		env: config.Env{
			"ISTIO_DUAL_STACK":      "true",
			"ENVOY_PROMETHEUS_PORT": "15190",
			"PROXY_CONFIG": `
proxyAdminPort: 15100
statusPort: 15200
concurrency: 4
configPath: /etc/envoy
extraStatTags: [request_host, ""]
proxyStatsMatcher:
  inclusionPrefixes: [upstream_cx, "http.{pod_ip}_"]
  inclusionSuffixes: [upstream_rq_timeout]
  inclusionRegexps: ['.*circuit_breakers.*']
runtimeValues:
  re2.max_program_size.error_level: ""
  envoy.reloadable_features.fixed_heap_use_allocated: "false"
  custom.flag: "42"
proxyMetadata:
  ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS: "100000"
`,
		},
		annos: map[string]string{
			"sidecar.istio.io/statsInclusionSuffixes": "upstream_rq_retry",
			"sidecar.istio.io/extraStatTags":          "request_host,upstream_peer",
			"sidecar.istio.io/statsHistogramBuckets":  `{"cluster_manager":[1,5,10],"http":[0.5,100]}`,
		},
		ifaceIPs:  []string{"10.244.1.7", "fd00::7"},
		tweakOpts: func(o *Options) { o.LogAsJSON = true; o.OutlierLogPath = "/dev/stdout" },
	},
}

func TestGolden(t *testing.T) {
	for name, tp := range goldenPods {
		t.Run(name, func(t *testing.T) {
			data, format, err := Generate(tp.params(t))
			if err != nil {
				t.Fatal(err)
			}
			if format != "json" {
				t.Fatalf("format = %q", format)
			}
			golden := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(golden, data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if diff := cmp.Diff(string(want), string(data)); diff != "" {
				t.Errorf("bootstrap differs from %s (-want +got), rerun with -update if intended:\n%s", golden, diff)
			}
			if err := Validate(want, "json"); err != nil {
				t.Errorf("golden does not validate: %v", err)
			}
		})
	}
}

// TestBuiltinShape checks the properties other parts of the agent rely on,
// independent of the goldens.
func TestBuiltinShape(t *testing.T) {
	p := goldenPods["sidecar-default"].params(t)
	data, _, err := Generate(p)
	if err != nil {
		t.Fatal(err)
	}
	b := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(data, b); err != nil {
		t.Fatal(err)
	}
	if got := b.GetDynamicResources().GetAdsConfig().GetApiType(); got != corev3.ApiConfigSource_DELTA_GRPC {
		t.Errorf("api_type = %v, want DELTA_GRPC", got)
	}
	var ports []uint32
	for _, l := range b.GetStaticResources().GetListeners() {
		ports = append(ports, l.GetAddress().GetSocketAddress().GetPortValue())
	}
	if diff := cmp.Diff([]uint32{15090}, ports); diff != "" {
		t.Errorf("static listener ports (no 15021: the agent serves it) (-want +got):\n%s", diff)
	}
	clusters := map[string]string{}
	for _, c := range b.GetStaticResources().GetClusters() {
		a := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress()
		if pipe := a.GetPipe(); pipe != nil {
			clusters[c.GetName()] = pipe.GetPath()
		} else {
			sa := a.GetSocketAddress()
			clusters[c.GetName()] = sa.GetAddress() + ":" + json.Number(itoa(sa.GetPortValue())).String()
		}
	}
	want := map[string]string{
		"prometheus_stats": "127.0.0.1:15000", "agent": "127.0.0.1:15020",
		"sds-grpc": "./var/run/secrets/workload-spiffe-uds/socket", "xds-grpc": "./etc/istio/proxy/XDS",
	}
	if diff := cmp.Diff(want, clusters); diff != "" {
		t.Errorf("static clusters (-want +got):\n%s", diff)
	}
	if id := b.GetNode().GetId(); id != "sidecar~10.244.1.7~productpage-v1-abc.bookinfo~bookinfo.svc.cluster.local" {
		t.Errorf("node id = %q", id)
	}
	if c := b.GetNode().GetCluster(); c != "productpage.bookinfo" {
		t.Errorf("node cluster = %q", c)
	}

	p.Delta = false
	sotw, err := Build(p)
	if err != nil {
		t.Fatal(err)
	}
	if got := sotw.GetDynamicResources().GetAdsConfig().GetApiType(); got != corev3.ApiConfigSource_GRPC {
		t.Errorf("ISTIO_DELTA_XDS=false: api_type = %v, want GRPC", got)
	}
}

func itoa(n uint32) string { b, _ := json.Marshal(n); return string(b) }

func TestOptionsFromEnv(t *testing.T) {
	got, err := OptionsFromEnv(config.Env{
		"ISTIO_DELTA_XDS": "false", "ENVOY_PROMETHEUS_PORT": "9090", "WORKLOAD_IDENTITY_SOCKET_FILE": "sock2",
		"ISTIO_BOOTSTRAP": "/t.json", "ISTIO_BOOTSTRAP_OVERRIDE": "/o.yaml", "HOST_IP": "1.2.3.4",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultOptions()
	want.Delta = false
	want.EnvoyPrometheusPort = 9090
	want.SDSSocketPath = "./var/run/secrets/workload-spiffe-uds/sock2"
	want.TemplateEnv, want.OverrideFile, want.HostIP = "/t.json", "/o.yaml", "1.2.3.4"
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	for env, wantErr := range map[string]string{
		"ISTIO_DELTA_XDS":               "env ISTIO_DELTA_XDS",
		"ENVOY_STATUS_PORT":             "env ENVOY_STATUS_PORT",
		"WORKLOAD_IDENTITY_SOCKET_FILE": "must be a file name",
	} {
		_, err := OptionsFromEnv(config.Env{env: "a/b"})
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s=a/b: err = %v, want %q", env, err, wantErr)
		}
	}
}
