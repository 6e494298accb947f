package config

import (
	"encoding/json"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func addrs(s ...string) []netip.Addr {
	out := make([]netip.Addr, len(s))
	for i, a := range s {
		out[i] = netip.MustParseAddr(a)
	}
	return out
}

func fakeInterfaces(ifs ...Interface) func() ([]Interface, error) {
	return func() ([]Interface, error) { return ifs, nil }
}

func TestNodeIPs(t *testing.T) {
	lo := Interface{Name: "lo", Up: true, Loopback: true, Addrs: addrs("127.0.0.1", "::1")}
	eth0 := Interface{Name: "eth0", Up: true, Addrs: addrs("10.1.2.3", "fe80::1", "fd00::3")}
	net1 := Interface{Name: "net1", Up: true, Addrs: addrs("192.168.9.9")}
	down := Interface{Name: "eth9", Up: false, Addrs: addrs("10.9.9.9")}
	for _, tc := range []struct {
		name  string
		ip    string
		ifs   []Interface
		annos map[string]string
		want  []netip.Addr
	}{
		{name: "instance ip first, no duplicate", ip: "10.1.2.3", ifs: []Interface{lo, eth0, net1, down},
			want: addrs("10.1.2.3", "fd00::3", "192.168.9.9")},
		{name: "excluded interface", ip: "10.1.2.3", ifs: []Interface{lo, eth0, net1},
			annos: map[string]string{ExcludeIfaceAnnotation: "net1, other"}, want: addrs("10.1.2.3", "fd00::3")},
		{name: "no private ips", ifs: []Interface{lo}, want: addrs("127.0.0.1", "::1")},
		{name: "instance ip and no private ips", ip: "10.0.0.7", ifs: []Interface{lo}, want: addrs("10.0.0.7", "127.0.0.1", "::1")},
		{name: "invalid instance ip ignored", ip: "not-an-ip", ifs: []Interface{net1}, want: addrs("192.168.9.9")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := nodeIPs(NodeOptions{Interfaces: fakeInterfaces(tc.ifs...), Pod: PodInfo{Annotations: tc.annos}}, Env{"INSTANCE_IP": tc.ip})
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("nodeIPs (-want +got):\n%s", diff)
			}
		})
	}
}

func TestNewNode(t *testing.T) {
	pc := Defaults()
	pc.Concurrency = ptr[int32](2)
	pc.ProxyMetadata = map[string]string{"ISTIO_META_FROM_PC": "pc", "ISTIO_META_CLUSTER_ID": "from-pc", "OTHER": "x"}
	env := Env{
		"POD_NAME": "web-0", "POD_NAMESPACE": "shop", "INSTANCE_IP": "10.1.2.3", "SERVICE_ACCOUNT": "web",
		"ISTIO_META_CLUSTER_ID": "Kubernetes", "ISTIO_META_MESH_ID": "cluster.local",
		"ISTIO_META_DNS_CAPTURE": "True", "ISTIO_META_ENABLE_HBONE": "false",
		"ISTIO_META_WORKLOAD_NAME": "web", "ISTIO_META_POD_PORTS": `[{"containerPort":8080,"protocol":"TCP"}]`,
		"ISTIO_METAJSON_LABELS":    `{"app":"web","version":"v1"}`,
		"ISTIO_META_ISTIO_VERSION": "1.28.0",
		"UNRELATED":                "x",
	}
	pod := PodInfo{
		Labels:      map[string]string{"app": "web", "pod-template-hash": "abc", LocalityLabel: "us-east1.us-east1-b"},
		Annotations: map[string]string{"sidecar.istio.io/status": `{"a":1}`},
	}
	n, err := NewNode(NodeOptions{
		Env: env, Pod: pod, Interfaces: fakeInterfaces(),
		EnvoyStatusPort: 15021, EnvoyPrometheusPort: 15090, IstioVersion: "ignored", StsPort: 15463,
	}, pc, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := "sidecar~10.1.2.3~web-0.shop~shop.svc.cluster.local"; n.ID != want {
		t.Errorf("ID = %q, want %q", n.ID, want)
	}
	if n.Cluster != "web.shop" {
		t.Errorf("Cluster = %q, want web.shop", n.Cluster)
	}
	if want := (Locality{Region: "us-east1", Zone: "us-east1-b"}); n.Locality != want {
		t.Errorf("Locality = %+v", n.Locality)
	}
	js, err := n.MetadataJSON()
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	pcJSON, _ := json.Marshal(pc)
	var pcAny any
	_ = json.Unmarshal(pcJSON, &pcAny)
	want := map[string]any{
		"ANNOTATIONS":           map[string]any{"sidecar.istio.io/status": `{"a":1}`},
		"CLUSTER_ID":            "Kubernetes",
		"DNS_CAPTURE":           "true",
		"ENABLE_HBONE":          "false",
		"ENVOY_PROMETHEUS_PORT": float64(15090),
		"ENVOY_STATUS_PORT":     float64(15021),
		"FROM_PC":               "pc",
		"INSTANCE_IPS":          "10.1.2.3,127.0.0.1,::1",
		"ISTIO_VERSION":         "1.28.0",
		"LABELS":                map[string]any{"app": "web", "version": "v1", LocalityLabel: "us-east1/us-east1-b"},
		"MESH_ID":               "cluster.local",
		"NAME":                  "web-0",
		"NAMESPACE":             "shop",
		"PILOT_SAN":             []any{"istiod.istio-system.svc"},
		"POD_PORTS":             `[{"containerPort":8080,"protocol":"TCP"}]`,
		"PROXY_CONFIG":          pcAny,
		"SERVICE_ACCOUNT":       "web",
		"STATIC_LABELS":         map[string]any{"app": "web", "version": "v1"},
		"STS_PORT":              "15463",
		"WORKLOAD_NAME":         "web",
		// ISTIO_METAJSON_* objects are merged at the top level, as in Istio.
		"app":     "web",
		"version": "v1",
	}
	// proxyMetadata is exported to the env, so it wins over the container env.
	want["CLUSTER_ID"] = "from-pc"
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("metadata (-want +got):\n%s", diff)
	}
}

func TestNodeMetadataErrors(t *testing.T) {
	for _, tc := range []struct {
		env     Env
		wantErr string
	}{
		{Env{"ISTIO_META_DNS_CAPTURE": "yes please"}, `node metadata DNS_CAPTURE (env ISTIO_META_DNS_CAPTURE): yes please is not a boolean`},
		{Env{"ISTIO_META_POD_PORTS": "8080"}, `POD_PORTS (env ISTIO_META_POD_PORTS): not a JSON list`},
		{Env{"ISTIO_METAJSON_LABELS": `{"a":1}`}, `env ISTIO_METAJSON_LABELS: want a JSON object of strings`},
	} {
		_, err := NewNode(NodeOptions{Env: tc.env, Interfaces: fakeInterfaces()}, Defaults(), nil)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("env %v: err = %v, want %q", tc.env, err, tc.wantErr)
		}
	}
}

func TestServiceCluster(t *testing.T) {
	labels := map[string]string{"app": "reviews", "service.istio.io/canonical-name": "reviews-canon"}
	for _, tc := range []struct {
		sc     string
		tsn    TracingServiceName
		labels map[string]string
		ns     string
		want   string
	}{
		{sc: "istio-proxy", labels: labels, ns: "bk", want: "reviews.bk"},
		{sc: "custom", labels: labels, ns: "bk", want: "custom"},
		{sc: "istio-proxy", ns: "bk", want: "wl.bk"},
		{tsn: TracingCanonicalNameOnly, labels: labels, ns: "bk", want: "reviews-canon"},
		{tsn: TracingCanonicalNameAndNamespace, labels: labels, ns: "bk", want: "reviews-canon.bk"},
		{tsn: TracingAppLabelAndNamespace, labels: labels, ns: "bk", want: "reviews.bk"},
	} {
		p := Defaults()
		p.ServiceCluster, p.TracingServiceName = tc.sc, tc.tsn
		if got := serviceCluster(p, tc.labels, "wl", tc.ns); got != tc.want {
			t.Errorf("serviceCluster(%q,%q) = %q, want %q", tc.sc, tc.tsn, got, tc.want)
		}
	}
}

func TestParseDownwardAPI(t *testing.T) {
	in := "app=\"web\"\nproxy.istio.io/config=\"concurrency: 2\\nproxyMetadata:\\n  A: \\\"b\\\"\\n\"\n\nempty=\"\"\n"
	got, err := ParseDownwardAPI(in)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"app": "web", "proxy.istio.io/config": "concurrency: 2\nproxyMetadata:\n  A: \"b\"\n", "empty": ""}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	for _, bad := range []string{"novalue", `k=unquoted`, `k="open`, `k="a" trailing`} {
		if _, err := ParseDownwardAPI(bad); err == nil {
			t.Errorf("ParseDownwardAPI(%q) succeeded", bad)
		}
	}
}

func TestReadPodInfo(t *testing.T) {
	root := t.TempDir()
	pi, err := ReadPodInfo(root)
	if err != nil || pi.Labels != nil || pi.Annotations != nil {
		t.Fatalf("missing files: %+v, %v", pi, err)
	}
	writeFile(t, root, PodLabelsPath, "app=\"web\"\n")
	writeFile(t, root, PodAnnotationsPath, "a=\"b\"\nbroken\n")
	_, err = ReadPodInfo(root)
	if err == nil || !strings.Contains(err.Error(), "annotations: line 2") {
		t.Fatalf("err = %v, want the file and line named", err)
	}
}

func FuzzParseDownwardAPI(f *testing.F) {
	f.Add("app=\"web\"\nk=\"a\\nb\"\n")
	f.Add("k=`raw`")
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseDownwardAPI(s)
		if err != nil {
			return
		}
		// Whatever parses must render back (Kubernetes' own format) to the same map.
		var b strings.Builder
		for _, k := range sortedKeys(m) {
			b.WriteString(k + "=" + quote(m[k]) + "\n")
		}
		back, err := ParseDownwardAPI(b.String())
		if err != nil {
			if strings.ContainsAny(strings.Join(sortedKeys(m), ""), "\n=") {
				return
			}
			t.Fatalf("re-parse of %q: %v", b.String(), err)
		}
		if diff := cmp.Diff(m, back); diff != "" && !strings.ContainsAny(strings.Join(sortedKeys(m), ""), "\n=\r") {
			t.Fatalf("roundtrip mismatch: %s", diff)
		}
	})
}

// quote is how Kubernetes writes downward API values (%q).
func quote(s string) string { return strconv.Quote(s) }

func FuzzOverlay(f *testing.F) {
	f.Add(`{"drainDuration":"5s","concurrency":"2","proxyMetadata":{"A":"b"}}`)
	f.Add("proxyStatsMatcher:\n  inclusionRegexps: [\"a.*\"]\n")
	f.Fuzz(func(t *testing.T, doc string) {
		p := Defaults()
		if _, err := overlay(p, "fuzz", []byte(doc)); err != nil {
			var ve *ValueError
			if !asValueError(err, &ve) {
				t.Fatalf("error %v is not a ValueError", err)
			}
			return
		}
		// Anything accepted renders and parses back to the same config.
		js, err := p.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		back := &ProxyConfig{}
		if _, err := overlay(back, "roundtrip", js); err != nil {
			t.Fatalf("re-parse %s: %v", js, err)
		}
	})
}

func asValueError(err error, target **ValueError) bool {
	ve, ok := err.(*ValueError)
	if ok {
		*target = ve
	}
	return ok
}
