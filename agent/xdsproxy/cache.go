package xdsproxy

import (
	"strconv"
	"sync"
)

// lastGood keeps, per type, the configuration Envoy last accepted (ACKed)
// from the control plane. It outlives Envoy's streams: an Envoy restarted
// during a control plane outage is served from it.
//
// SotW keeps the accepted response per type; Delta keeps the accepted
// resources per type and name. Both hold slices of the frames as received,
// never decoded copies.
type lastGood struct {
	mu    sync.Mutex
	sotw  map[string]*frame
	delta map[string]map[string]resourceRef
	seq   uint64

	// The name table's accepted version(s), for NDS requests after a
	// reconnect.
	ndsVersion  string
	ndsVersions map[string]string
}

func newLastGood() *lastGood {
	return &lastGood{sotw: map[string]*frame{}, delta: map[string]map[string]resourceRef{}, ndsVersions: map[string]string{}}
}

// cacheNonce returns a nonce that cannot be mistaken for the control
// plane's: Envoy's ACKs of cached responses are recognised and kept local.
func (c *lastGood) cacheNonce() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	return "outrigger-cache-" + strconv.FormatUint(c.seq, 10)
}

func (c *lastGood) acceptSotw(f *frame) {
	c.mu.Lock()
	c.sotw[f.typeURL] = f
	c.mu.Unlock()
}

func (c *lastGood) acceptDelta(f *frame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.delta[f.typeURL]
	if m == nil {
		m = map[string]resourceRef{}
		c.delta[f.typeURL] = m
	}
	for _, r := range f.resources {
		m[r.name] = r
	}
	for _, name := range f.removed {
		delete(m, name)
	}
}

// sotwFrame returns the accepted response for typeURL under a cache nonce,
// or nil.
func (c *lastGood) sotwFrame(typeURL string) *frame {
	c.mu.Lock()
	f := c.sotw[typeURL]
	c.mu.Unlock()
	if f == nil {
		return nil
	}
	return f.withNonce(c.cacheNonce())
}

// deltaFrame returns the accepted resources of typeURL that the subscription
// covers and that Envoy does not already have at that version, or nil.
func (c *lastGood) deltaFrame(typeURL string, wildcard bool, subs map[string]struct{}, has map[string]string) *frame {
	c.mu.Lock()
	var out []resourceRef
	for name, r := range c.delta[typeURL] {
		if _, ok := subs[name]; !ok && !wildcard {
			continue
		}
		if v, ok := has[name]; ok && v == r.version {
			continue
		}
		out = append(out, r)
	}
	c.mu.Unlock()
	if len(out) == 0 {
		return nil
	}
	return newDeltaFrame(typeURL, c.cacheNonce(), out, nil)
}

func (c *lastGood) setNDSVersion(v string) {
	c.mu.Lock()
	c.ndsVersion = v
	c.mu.Unlock()
}

func (c *lastGood) ndsSotwVersion() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ndsVersion
}

func (c *lastGood) acceptNDSDelta(f *frame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range f.resources {
		c.ndsVersions[r.name] = r.version
	}
	for _, n := range f.removed {
		delete(c.ndsVersions, n)
	}
}

func (c *lastGood) ndsDeltaVersions() map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]string, len(c.ndsVersions))
	for k, v := range c.ndsVersions {
		out[k] = v
	}
	return out
}
