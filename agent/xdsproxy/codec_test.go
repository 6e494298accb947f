package xdsproxy

import (
	"bytes"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
)

// envelope is what the parser reads of a frame, for comparisons.
type envelope struct {
	Delta                   bool
	TypeURL, Version, Nonce string
	Removed                 []string
	// Resources: name, version and size of each.
	Resources []string
}

func envelopeOf(f *frame) envelope {
	e := envelope{Delta: f.delta, TypeURL: f.typeURL, Version: f.version, Nonce: f.nonce, Removed: f.removed}
	for _, r := range f.resources {
		e.Resources = append(e.Resources, r.name+"@"+r.version+"/"+strconv.Itoa(r.n))
	}
	return e
}

// chunked splits b into buffers of size bytes, as grpc hands over a message
// in its 16 KiB receive buffers.
func chunked(b []byte, size int) mem.BufferSlice {
	var out mem.BufferSlice
	for len(b) > 0 {
		n := min(size, len(b))
		out = append(out, mem.SliceBuffer(b[:n:n]))
		b = b[n:]
	}
	return out
}

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
		want  envelope
		value string // resourceValue(1)
	}{
		{"sotw", sotw, false, envelope{TypeURL: cdsType, Version: "v7", Nonce: "n7", Resources: []string{"@/58", "@/57"}}, "de"},
		{"delta", delta, true, envelope{Delta: true, TypeURL: cdsType, Version: "s1", Nonce: "d1", Removed: []string{"gone"},
			Resources: []string{"a@1/64", "b@2/64"}}, "B"},
	}
	for _, tc := range tests {
		b, err := proto.Marshal(tc.msg)
		if err != nil {
			t.Fatal(err)
		}
		// Every split of the message into buffers reads the same.
		for _, size := range []int{len(b), 1, 2, 3, 5, 16} {
			t.Run(tc.name+"/buffers of "+strconv.Itoa(size), func(t *testing.T) {
				f, err := newFrame(tc.delta, chunked(b, size))
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(tc.want, envelopeOf(f)); diff != "" {
					t.Errorf("envelope (-want +got):\n%s", diff)
				}
				v, err := f.resourceValue(1)
				if err != nil || string(v) != tc.value {
					t.Errorf("resourceValue(1) = %q, %v; want %q", v, err, tc.value)
				}
			})
		}
	}

	t.Run("withNonce keeps everything else", func(t *testing.T) {
		b, _ := proto.Marshal(sotw)
		f, err := newFrame(false, chunked(b, 3))
		if err != nil {
			t.Fatal(err)
		}
		got := &discovery.DiscoveryResponse{}
		if err := proto.Unmarshal(f.withNonce("outrigger-cache-1").data.Materialize(), got); err != nil {
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
		f, err := newFrame(true, chunked(b, 5))
		if err != nil {
			t.Fatal(err)
		}
		got := &discovery.DeltaDiscoveryResponse{}
		nf, err := newDeltaFrame(cdsType, "c1", []cachedResource{{f: f, r: f.resources[0]}}, []string{"x"})
		if err != nil {
			t.Fatal(err)
		}
		if err := proto.Unmarshal(nf.data.Materialize(), got); err != nil {
			t.Fatal(err)
		}
		want := &discovery.DeltaDiscoveryResponse{TypeUrl: cdsType, Nonce: "c1", Resources: delta.Resources[:1], RemovedResources: []string{"x"}}
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
}

// A received frame is forwarded as the buffers it arrived in, and they go
// back to the pool when its last holder lets go, not before.
func TestFrameBuffersAreShared(t *testing.T) {
	b, _ := proto.Marshal(&discovery.DiscoveryResponse{TypeUrl: cdsType, Nonce: "n",
		Resources: []*anypb.Any{{TypeUrl: cdsType, Value: bytes.Repeat([]byte("x"), 40000)}}})
	pool := &countingPool{}
	var data mem.BufferSlice
	for c := range slices.Chunk(b, 16384) {
		buf := pool.Get(len(c))
		copy(*buf, c)
		data = append(data, mem.NewBuffer(buf, pool))
	}
	codec := newRawCodec()
	f := &frame{}
	if err := codec.Unmarshal(data, f); err != nil {
		t.Fatal(err)
	}
	data.Free() // grpc frees its own reference after Unmarshal
	if pool.put != 0 {
		t.Fatalf("%d buffers back in the pool while the frame holds them", pool.put)
	}
	out, err := codec.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != len(data) || &out[0].ReadOnlyData()[0] != &data[0].ReadOnlyData()[0] {
		t.Error("Marshal did not hand over the received buffers")
	}
	out.Free() // grpc, after the write
	f.hold()   // e.g. the cache
	f.release()
	if pool.put != 0 {
		t.Fatalf("%d buffers back in the pool while the frame is held", pool.put)
	}
	f.release()
	if pool.put != len(data) {
		t.Errorf("%d of %d buffers back in the pool after the last release", pool.put, len(data))
	}
}

type countingPool struct{ put int }

func (p *countingPool) Get(n int) *[]byte { b := make([]byte, n); return &b }
func (p *countingPool) Put(*[]byte)       { p.put++ }

// parseFlat is the straightforward parser over one contiguous message, the
// reference the buffer-walking parser must agree with.
func parseFlat(delta bool, raw []byte) (envelope, error) {
	var f frame
	f.delta = delta
	err := forEachField(raw, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch {
		case num == sotwVersion:
			f.version = string(v)
		case num == sotwTypeURL:
			f.typeURL = string(v)
		case num == sotwNonce:
			f.nonce = string(v)
		case num == sotwResource && !delta:
			f.resources = append(f.resources, resourceRef{n: len(v)})
		case num == deltaResource && delta:
			r := resourceRef{n: len(v)}
			err := forEachField(v, func(num protowire.Number, typ protowire.Type, v []byte) error {
				switch {
				case typ != protowire.BytesType:
				case num == resName:
					r.name = string(v)
				case num == resVersion:
					r.version = string(v)
				}
				return nil
			})
			if err != nil {
				return err
			}
			f.resources = append(f.resources, r)
		case num == deltaRemoved && delta:
			f.removed = append(f.removed, string(v))
		}
		return nil
	})
	return envelopeOf(&f), err
}

// FuzzFrameParse: whatever the control plane sends, in whatever buffers,
// the parser agrees with the flat reference parser and never panics, and a
// parsed SotW frame re-nonced still parses.
func FuzzFrameParse(f *testing.F) {
	b, _ := proto.Marshal(&discovery.DiscoveryResponse{VersionInfo: "1", TypeUrl: cdsType, Nonce: "n",
		Resources: []*anypb.Any{{TypeUrl: cdsType, Value: []byte("x")}}})
	f.Add(b, false, uint8(3))
	d, _ := proto.Marshal(&discovery.DeltaDiscoveryResponse{TypeUrl: cdsType, Nonce: "n",
		Resources: []*discovery.Resource{{Name: "a", Resource: &anypb.Any{Value: []byte("y")}}}})
	f.Add(d, true, uint8(1))
	f.Fuzz(func(t *testing.T, raw []byte, delta bool, chunk uint8) {
		want, wantErr := parseFlat(delta, raw)
		fr, err := newFrame(delta, chunked(raw, int(chunk)+1))
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("error %v, flat parser's %v", err, wantErr)
		}
		if err != nil {
			return
		}
		if diff := cmp.Diff(want, envelopeOf(fr), cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("(-flat +buffers):\n%s", diff)
		}
		for i := range fr.resources {
			_, _ = fr.resourceValue(i)
		}
		if !delta {
			if _, err := flatFrame(false, fr.withNonce("z").data.Materialize()); err != nil {
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
	c := Config{DiscoveryAddress: "istiod:15012"}
	if err := c.setDefaults(); err != nil || c.Transport != TransportCutThrough {
		t.Errorf("default transport %q (%v), want %q", c.Transport, err, TransportCutThrough)
	}
	c = Config{DiscoveryAddress: "istiod:15012", Transport: "quic"}
	if err := c.setDefaults(); err == nil || !strings.Contains(err.Error(), "OUTRIGGER_XDS_TRANSPORT") {
		t.Errorf("transport quic: %v, want an error naming OUTRIGGER_XDS_TRANSPORT", err)
	}
	got := HeadersFromEnv([]string{"XDS_HEADER_X-Foo=bar", "XDS_HEADER_=x", "OTHER=1", "XDS_HEADER_B=c=d"})
	if diff := cmp.Diff(map[string]string{"X-Foo": "bar", "B": "c=d"}, got); diff != "" {
		t.Errorf("HeadersFromEnv (-want +got):\n%s", diff)
	}
}

// bigPush is a 3000-service CDS response (~7 MB) as the control plane
// sends it.
func bigPush(b *testing.B, delta bool) []byte {
	body := bytes.Repeat([]byte("x"), 2300)
	var msg proto.Message
	if delta {
		r := &discovery.DeltaDiscoveryResponse{TypeUrl: cdsType, Nonce: "1", SystemVersionInfo: "v1"}
		for i := range 3000 {
			r.Resources = append(r.Resources, &discovery.Resource{Name: "outbound|80||svc-" + strconv.Itoa(i), Version: "v1",
				Resource: &anypb.Any{TypeUrl: cdsType, Value: body}})
		}
		msg = r
	} else {
		r := &discovery.DiscoveryResponse{TypeUrl: cdsType, Nonce: "1", VersionInfo: "v1"}
		for range 3000 {
			r.Resources = append(r.Resources, &anypb.Any{TypeUrl: cdsType, Value: body})
		}
		msg = r
	}
	raw, err := proto.Marshal(msg)
	if err != nil {
		b.Fatal(err)
	}
	return raw
}

// BenchmarkForward is the proxy's work on a 3000-resource (~7 MB) push
// between grpc's receive and send: take the receive buffers, read the
// envelope, hand the same buffers to the send, let go. B/op and allocs/op
// are what it costs beyond grpc's own buffers (nothing is copied).
func BenchmarkForward(b *testing.B) {
	for _, m := range modes {
		raw := bigPush(b, m.delta)
		data := chunked(raw, 16384) // grpc's receive buffers
		codec := newRawCodec()
		b.Run(m.name, func(b *testing.B) {
			b.SetBytes(int64(len(raw)))
			b.ReportAllocs()
			for b.Loop() {
				f := &frame{delta: m.delta}
				if err := codec.Unmarshal(data, f); err != nil {
					b.Fatal(err)
				}
				out, err := codec.Marshal(f)
				if err != nil {
					b.Fatal(err)
				}
				out.Free()
				f.release()
			}
		})
	}
}
