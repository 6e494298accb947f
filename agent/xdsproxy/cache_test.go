package xdsproxy

import (
	"sort"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
)

// The last-known-good CDS of a large mesh is compressed in the background
// and the received buffers let go; an Envoy restarted during an outage is
// served exactly the accepted clusters from the compressed copy.
func TestLastGoodCompressed(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			mesh := controlplane.GenerateMesh(100) // padded clusters: ~230 KB of CDS
			cp := startCP(t, controlplane.Config{}, mesh)
			p := startProxy(t, Config{DiscoveryAddress: cp.Addr(), Plaintext: true})
			c := dialEnvoy(t, p.socket, m.delta, "n1")
			if err := c.Subscribe(cdsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			r := recvType(t, c, cdsType)
			if err := c.ACK(r, nil); err != nil {
				t.Fatal(err)
			}
			waitCP(t, cp, "the ACK", func(e controlplane.Event) bool { return e.Nonce == r.Nonce })

			// The received buffers go back to the pool (a send that
			// Envoy ACKed before it returned may hold them a moment).
			for _, f := range waitCompacted(t, p.cache, cdsType, m.delta) {
				deadline := time.Now().Add(5 * time.Second)
				for f.refs.Load() != 0 {
					if time.Now().After(deadline) {
						t.Fatalf("a compacted frame still has %d references", f.refs.Load())
					}
					time.Sleep(time.Millisecond)
				}
			}

			cp.Stop()
			c.Close()
			c2 := dialEnvoy(t, p.socket, m.delta, "n1")
			if err := c2.Subscribe(cdsType, nil, "", nil); err != nil {
				t.Fatal(err)
			}
			got := recvType(t, c2, cdsType)
			if !strings.HasPrefix(got.Nonce, "outrigger-cache-") {
				t.Errorf("nonce %q: not served from the cache", got.Nonce)
			}
			if diff := cmp.Diff(resourcesOf(r), resourcesOf(got), protocmp.Transform()); diff != "" {
				t.Errorf("cached clusters differ from the accepted ones (-accepted +cached):\n%s", diff)
			}
		})
	}
}

// waitCompacted waits until everything the cache keeps of typeURL is
// compressed, and returns the frames it held before.
func waitCompacted(t *testing.T, c *lastGood, typeURL string, delta bool) []*frame {
	t.Helper()
	var frames []*frame
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		done := true
		if delta {
			for _, e := range c.delta[typeURL] {
				if e.f != nil {
					frames = append(frames, e.f)
					done = false
				}
			}
			done = done && len(c.delta[typeURL]) > 0
		} else {
			e := c.sotw[typeURL]
			if e.f != nil {
				frames = append(frames, e.f)
			}
			done = e.z != nil
		}
		c.mu.Unlock()
		if done {
			return frames
		}
		if time.Now().After(deadline) {
			t.Fatal("the cache never compressed the accepted configuration")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func resourcesOf(r *controlplane.Response) []*anypb.Any {
	var out []*anypb.Any
	if r.Sotw != nil {
		out = r.Sotw.GetResources()
	} else {
		res := append([]*discovery.Resource(nil), r.Delta.GetResources()...)
		sort.Slice(res, func(i, j int) bool { return res[i].GetName() < res[j].GetName() })
		for _, x := range res {
			out = append(out, x.GetResource())
		}
	}
	if r.Sotw != nil {
		sort.Slice(out, func(i, j int) bool { return string(out[i].GetValue()) < string(out[j].GetValue()) })
	}
	return out
}
