package xdsproxy

import (
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestFrameParse(t *testing.T) {
	sotw := &discovery.DiscoveryResponse{VersionInfo: "v7", TypeUrl: cdsType, Nonce: "n7",
		Resources: []*anypb.Any{{TypeUrl: cdsType, Value: []byte("abc")}, {TypeUrl: cdsType, Value: []byte("de")}}}
	delta := &discovery.DeltaDiscoveryResponse{SystemVersionInfo: "s1", TypeUrl: cdsType, Nonce: "d1",
		Resources: []*discovery.Resource{
			{Name: "a", Version: "1", Resource: &anypb.Any{TypeUrl: cdsType, Value: []byte("A")}},
			{Name: "b", Version: "2", Resource: &anypb.Any{TypeUrl: cdsType, Value: []byte("B")}},
		},
		RemovedResources: []string{"gone"}}
	tests := []struct {
		name  string
		msg   proto.Message
		delta bool
		want  frame
		value string // resourceValue(1)
	}{
		{"sotw", sotw, false, frame{typeURL: cdsType, version: "v7", nonce: "n7"}, "de"},
		{"delta", delta, true, frame{delta: true, typeURL: cdsType, version: "s1", nonce: "d1", removed: []string{"gone"}}, "B"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := proto.Marshal(tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			f := &frame{delta: tc.delta, raw: b}
			if err := f.parse(); err != nil {
				t.Fatal(err)
			}
			got := frame{delta: f.delta, typeURL: f.typeURL, version: f.version, nonce: f.nonce, removed: f.removed}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(frame{}, resourceRef{})); diff != "" {
				t.Errorf("envelope (-want +got):\n%s", diff)
			}
			if len(f.resources) != 2 {
				t.Fatalf("%d resources, want 2", len(f.resources))
			}
			if tc.delta && (f.resources[0].name != "a" || f.resources[1].version != "2") {
				t.Errorf("delta resources = %+v", f.resources)
			}
			v, err := f.resourceValue(1)
			if err != nil || string(v) != tc.value {
				t.Errorf("resourceValue(1) = %q, %v; want %q", v, err, tc.value)
			}
		})
	}

	t.Run("withNonce keeps everything else", func(t *testing.T) {
		b, _ := proto.Marshal(sotw)
		f := &frame{raw: b}
		_ = f.parse()
		got := &discovery.DiscoveryResponse{}
		if err := proto.Unmarshal(f.withNonce("outrigger-cache-1").raw, got); err != nil {
			t.Fatal(err)
		}
		want := proto.Clone(sotw).(*discovery.DiscoveryResponse)
		want.Nonce = "outrigger-cache-1"
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	t.Run("newDeltaFrame", func(t *testing.T) {
		b, _ := proto.Marshal(delta)
		f := &frame{delta: true, raw: b}
		_ = f.parse()
		got := &discovery.DeltaDiscoveryResponse{}
		if err := proto.Unmarshal(newDeltaFrame(cdsType, "c1", f.resources[:1], []string{"x"}).raw, got); err != nil {
			t.Fatal(err)
		}
		want := &discovery.DeltaDiscoveryResponse{TypeUrl: cdsType, Nonce: "c1", Resources: delta.Resources[:1], RemovedResources: []string{"x"}}
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
}

// FuzzFrameParse: whatever the control plane sends, parsing never panics
// and a parsed SotW frame re-nonced still parses.
func FuzzFrameParse(f *testing.F) {
	b, _ := proto.Marshal(&discovery.DiscoveryResponse{VersionInfo: "1", TypeUrl: cdsType, Nonce: "n",
		Resources: []*anypb.Any{{TypeUrl: cdsType, Value: []byte("x")}}})
	f.Add(b, false)
	d, _ := proto.Marshal(&discovery.DeltaDiscoveryResponse{TypeUrl: cdsType, Nonce: "n",
		Resources: []*discovery.Resource{{Name: "a", Resource: &anypb.Any{Value: []byte("y")}}}})
	f.Add(d, true)
	f.Fuzz(func(t *testing.T, raw []byte, delta bool) {
		fr := &frame{delta: delta, raw: raw}
		if err := fr.parse(); err != nil {
			return
		}
		for i := range fr.resources {
			_, _ = fr.resourceValue(i)
		}
		if !delta {
			if err := fr.withNonce("z").parse(); err != nil {
				t.Errorf("re-nonced frame does not parse: %v", err)
			}
		}
	})
}

func TestBackoffDelay(t *testing.T) {
	min, max := 100*time.Millisecond, 5*time.Second
	tests := []struct {
		attempt int
		lo, hi  time.Duration
	}{
		{0, 50 * time.Millisecond, 100 * time.Millisecond},
		{1, 100 * time.Millisecond, 200 * time.Millisecond},
		{3, 400 * time.Millisecond, 800 * time.Millisecond},
		{6, 2500 * time.Millisecond, 5 * time.Second},
		{40, 2500 * time.Millisecond, 5 * time.Second},
	}
	for _, tc := range tests {
		lo := backoffDelay(tc.attempt, min, max, func(int64) int64 { return 0 })
		hi := backoffDelay(tc.attempt, min, max, func(n int64) int64 { return n - 1 })
		if lo != tc.lo || hi < tc.hi-time.Nanosecond || hi > tc.hi {
			t.Errorf("attempt %d: range [%v, %v], want [%v, %v]", tc.attempt, lo, hi, tc.lo, tc.hi)
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	tests := []struct {
		addr, san, want string
	}{
		{"istiod.istio-system.svc:15012", "", "istiod.istio-system.svc"},
		{"localhost:15012", "", "istiod.istio-system.svc"},
		{"istiod-east.example:15012", "", "istiod-east.example"},
		{"localhost:15012", "custom.san", "custom.san"},
	}
	for _, tc := range tests {
		c := Config{DiscoveryAddress: tc.addr, ServerName: tc.san}
		if err := c.setDefaults(); err != nil {
			t.Fatal(err)
		}
		if c.ServerName != tc.want {
			t.Errorf("%s (ISTIOD_SAN %q): server name %q, want %q", tc.addr, tc.san, c.ServerName, tc.want)
		}
	}
	for _, bad := range []string{"", "no-port"} {
		c := Config{DiscoveryAddress: bad}
		if err := c.setDefaults(); err == nil {
			t.Errorf("discovery address %q accepted", bad)
		}
	}
	got := HeadersFromEnv([]string{"XDS_HEADER_X-Foo=bar", "XDS_HEADER_=x", "OTHER=1", "XDS_HEADER_B=c=d"})
	if diff := cmp.Diff(map[string]string{"X-Foo": "bar", "B": "c=d"}, got); diff != "" {
		t.Errorf("HeadersFromEnv (-want +got):\n%s", diff)
	}
}
