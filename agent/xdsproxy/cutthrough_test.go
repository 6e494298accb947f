package xdsproxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// bigSotw is a SotW response of n resources of typeURL, each pad bytes.
func bigSotw(typeURL string, n, pad int) *discovery.DiscoveryResponse {
	r := &discovery.DiscoveryResponse{VersionInfo: "v1", TypeUrl: typeURL, Nonce: "n1"}
	for i := range n {
		r.Resources = append(r.Resources, &anypb.Any{TypeUrl: typeURL, Value: bytes.Repeat([]byte{byte(i)}, pad)})
	}
	return r
}

func bigDelta(typeURL string, n, pad int) *discovery.DeltaDiscoveryResponse {
	r := &discovery.DeltaDiscoveryResponse{SystemVersionInfo: "s1", TypeUrl: typeURL, Nonce: "d1", RemovedResources: []string{"gone"}}
	for i := range n {
		r.Resources = append(r.Resources, &discovery.Resource{Name: "r" + strconv.Itoa(i), Version: "1",
			Resource: &anypb.Any{TypeUrl: typeURL, Value: bytes.Repeat([]byte{byte(i)}, pad)}})
	}
	return r
}

// grpcMessage is m with its gRPC length prefix.
func grpcMessage(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 5, 5+len(b))
	binary.BigEndian.PutUint32(out[1:], uint32(len(b)))
	return append(out, b...)
}

func TestSniffType(t *testing.T) {
	sotw := grpcMessage(t, bigSotw(cdsType, 3, 10))[5:]
	delta := grpcMessage(t, bigDelta(edsType, 3, 10))[5:]
	// type_url first, as another control plane might order fields.
	first := protowire.AppendString(protowire.AppendTag(nil, sotwTypeURL, protowire.BytesType), ldsType)
	first = append(first, sotw...)
	anyStart := bytes.Index(sotw, []byte(cdsType))
	tests := []struct {
		name   string
		b      []byte
		delta  bool
		want   string
		wantOK bool
	}{
		{"sotw", sotw, false, cdsType, true},
		{"sotw first resource cut after its type", sotw[:anyStart+len(cdsType)], false, cdsType, true},
		{"sotw cut inside the type", sotw[:anyStart+5], false, "", false},
		{"delta", delta, true, edsType, true},
		{"type_url first", first, false, ldsType, true},
		{"only a version", sotw[:4], false, "", false},
		{"empty", nil, false, "", false},
		{"garbage", []byte{0xff, 0xff, 0xff}, false, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := sniffType(tc.b, tc.delta)
			if got != tc.want || ok != tc.wantOK {
				t.Errorf("sniffType = %q, %v; want %q, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

// bufWriter collects what writeFrame writes.
type bufWriter struct {
	bytes.Buffer
	flushes int
	// flushed, if set, is closed at the first flush.
	flushed chan struct{}
}

func (w *bufWriter) Flush() error {
	if w.flushes++; w.flushes == 1 && w.flushed != nil {
		close(w.flushed)
	}
	return nil
}

// trickle writes b to a pipe in small pieces, as a network would, and
// returns the reading end; fail, if set, ends the stream with an error at
// that offset instead.
func trickle(b []byte, piece, fail int) io.Reader {
	pr, pw := io.Pipe()
	go func() {
		for off := 0; off < len(b); off += piece {
			if fail > 0 && off >= fail {
				pw.CloseWithError(errors.New("connection reset"))
				return
			}
			if _, err := pw.Write(b[off:min(off+piece, len(b))]); err != nil {
				return
			}
		}
		pw.Close()
	}()
	return pr
}

func TestRecvFrameCutThrough(t *testing.T) {
	tests := []struct {
		name  string
		msg   proto.Message
		delta bool
		grows bool
	}{
		{"large sotw CDS", bigSotw(cdsType, 200, 1000), false, true},
		{"large delta EDS", bigDelta(edsType, 200, 1000), true, true},
		{"small sotw", bigSotw(cdsType, 2, 10), false, false},
		{"large name table is kept whole", bigSotw(nds.TypeURL, 200, 1000), false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wire := grpcMessage(t, tc.msg)
			f, err := recvFrame(trickle(wire, 7000, 0), tc.delta)
			if err != nil {
				t.Fatal(err)
			}
			defer f.release()
			if f.growing() != tc.grows {
				t.Fatalf("growing = %v, want %v", f.growing(), tc.grows)
			}
			var out bufWriter
			if f.growing() {
				// The writer follows the frame while the filler reads it:
				// it sends what arrived so far before the rest is read.
				out.flushed = make(chan struct{})
				var wg sync.WaitGroup
				var werr error
				wg.Go(func() { werr = writeFrame(&out, f) })
				select {
				case <-out.flushed:
				case <-time.After(10 * time.Second):
					f.abort(errors.New("test gave up"))
					wg.Wait()
					t.Fatal("nothing forwarded before the rest of the message was read")
				}
				var env *frame
				if err := f.g.fill(func(e *frame) { env = e; f.setEnvelope(e) }); err != nil {
					t.Fatal(err)
				}
				wg.Wait()
				if werr != nil {
					t.Fatal(werr)
				}
				if env == nil {
					t.Fatal("finalize not called")
				}
				if out.flushes < 2 {
					t.Errorf("%d flushes: the frame was not forwarded while it arrived", out.flushes)
				}
			} else if err := writeFrame(&out, f); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), wire) {
				t.Fatalf("forwarded %d bytes differ from the %d received", out.Len(), len(wire))
			}
			want, err := parseFlat(tc.delta, wire[5:])
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, envelopeOf(f)); diff != "" {
				t.Errorf("envelope (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRecvFrameAborted(t *testing.T) {
	wire := grpcMessage(t, bigSotw(cdsType, 200, 1000))

	t.Run("writer midway fails", func(t *testing.T) {
		f, err := recvFrame(trickle(wire, 7000, 100000), false)
		if err != nil {
			t.Fatal(err)
		}
		defer f.release()
		var out bufWriter
		done := make(chan error, 1)
		go func() { done <- writeFrame(&out, f) }()
		if err := f.g.fill(func(*frame) { t.Error("finalized a truncated message") }); err == nil {
			t.Fatal("fill of a truncated message succeeded")
		}
		if err := <-done; err == nil || errors.Is(err, errFrameAborted) {
			t.Fatalf("writer: %v, want a failure (part of the message was written)", err)
		}
	})

	t.Run("writer not started skips", func(t *testing.T) {
		f, err := recvFrame(trickle(wire, 7000, 100000), false)
		if err != nil {
			t.Fatal(err)
		}
		defer f.release()
		if err := f.g.fill(func(*frame) {}); err == nil {
			t.Fatal("fill of a truncated message succeeded")
		}
		var out bufWriter
		if err := writeFrame(&out, f); !errors.Is(err, errFrameAborted) || out.Len() != 0 {
			t.Fatalf("writer: %v after %d bytes, want errFrameAborted and nothing written", err, out.Len())
		}
	})

	t.Run("malformed resource in the middle", func(t *testing.T) {
		// The incremental parser finds it long before the end; the frame
		// still fails only once the message is read, as a whole parse did.
		raw, err := proto.Marshal(bigDelta(edsType, 200, 1000))
		if err != nil {
			t.Fatal(err)
		}
		bad := protowire.AppendBytes(protowire.AppendTag(nil, deltaResource, protowire.BytesType), []byte{0x1a, 0x05, 'a'})
		raw = append(append(append([]byte{}, raw[:len(raw)/2]...), bad...), raw[len(raw)/2:]...)
		wire := make([]byte, 5, 5+len(raw))
		binary.BigEndian.PutUint32(wire[1:], uint32(len(raw)))
		f, err := recvFrame(trickle(append(wire, raw...), 7000, 0), true)
		if err != nil {
			t.Fatal(err)
		}
		defer f.release()
		err = f.g.fill(func(*frame) { t.Error("finalized a malformed message") })
		if err == nil || !strings.Contains(err.Error(), "resource: malformed protobuf") {
			t.Fatalf("fill: %v, want the malformed resource", err)
		}
		var out bufWriter
		if err := writeFrame(&out, f); !errors.Is(err, errFrameAborted) || out.Len() != 0 {
			t.Fatalf("writer: %v after %d bytes, want errFrameAborted and nothing written", err, out.Len())
		}
	})

	t.Run("type changes at the end", func(t *testing.T) {
		m := bigSotw(cdsType, 200, 1000)
		m.TypeUrl = nds.TypeURL // resources say CDS, the envelope says NDS
		f, err := recvFrame(trickle(grpcMessage(t, m), 7000, 0), false)
		if err != nil {
			t.Fatal(err)
		}
		defer f.release()
		if err := f.g.fill(func(*frame) { t.Error("finalized") }); err == nil {
			t.Fatal("a response whose type does not match its resources was accepted")
		}
		var out bufWriter
		if err := writeFrame(&out, f); !errors.Is(err, errFrameAborted) || out.Len() != 0 {
			t.Fatalf("writer: %v after %d bytes, want errFrameAborted and nothing written", err, out.Len())
		}
	})
}

func TestReadMessageHeaderErrors(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
	}{
		{"compressed", []byte{1, 0, 0, 0, 1, 0}},
		{"too large", []byte{0, 0xff, 0xff, 0xff, 0xff}},
		{"cut short", []byte{0, 0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := recvFrame(bytes.NewReader(tc.in), false); err == nil {
				t.Fatal("no error")
			}
		})
	}
}
