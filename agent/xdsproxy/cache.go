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
// resources per type and name. Both hold the frames as received (a
// reference each: one per SotW type, one per Delta resource), never
// decoded or flattened copies, so keeping the last-known-good costs no
// memory beyond the response Envoy was sent.
type lastGood struct {
	mu    sync.Mutex
	sotw  map[string]*frame
	delta map[string]map[string]cachedResource
	seq   uint64

	// The name table's accepted version(s), for NDS requests after a
	// reconnect.
	ndsVersion  string
	ndsVersions map[string]string
}

func newLastGood() *lastGood {
	return &lastGood{sotw: map[string]*frame{}, delta: map[string]map[string]cachedResource{}, ndsVersions: map[string]string{}}
}

// cacheNonce returns a nonce that cannot be mistaken for the control
// plane's: Envoy's ACKs of cached responses are recognised and kept local.
func (c *lastGood) cacheNonce() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cacheNonceLocked()
}

func (c *lastGood) cacheNonceLocked() string {
	c.seq++
	return "outrigger-cache-" + strconv.FormatUint(c.seq, 10)
}

// acceptSotw keeps f, taking over the caller's reference.
func (c *lastGood) acceptSotw(f *frame) {
	c.mu.Lock()
	old := c.sotw[f.typeURL]
	c.sotw[f.typeURL] = f
	c.mu.Unlock()
	if old != nil {
		old.release()
	}
}

// acceptDelta keeps f's resources (holding f once for each); the caller
// keeps its own reference.
func (c *lastGood) acceptDelta(f *frame) {
	var drop []*frame
	c.mu.Lock()
	m := c.delta[f.typeURL]
	if m == nil {
		m = map[string]cachedResource{}
		c.delta[f.typeURL] = m
	}
	for _, r := range f.resources {
		if old, ok := m[r.name]; ok {
			drop = append(drop, old.f)
		}
		m[r.name] = cachedResource{f: f.hold(), r: r}
	}
	for _, name := range f.removed {
		if old, ok := m[name]; ok {
			drop = append(drop, old.f)
			delete(m, name)
		}
	}
	c.mu.Unlock()
	for _, old := range drop {
		old.release()
	}
}

// sotwFrame returns the accepted response for typeURL under a cache nonce,
// or nil.
func (c *lastGood) sotwFrame(typeURL string) *frame {
	c.mu.Lock()
	f := c.sotw[typeURL]
	if f == nil {
		c.mu.Unlock()
		return nil
	}
	f.hold()
	nonce := c.cacheNonceLocked()
	c.mu.Unlock()
	defer f.release()
	return f.withNonce(nonce)
}

// deltaFrame returns the accepted resources of typeURL that the subscription
// covers and that Envoy does not already have at that version, or nil.
func (c *lastGood) deltaFrame(typeURL string, wildcard bool, subs map[string]struct{}, has map[string]string) *frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []cachedResource
	for name, r := range c.delta[typeURL] {
		if _, ok := subs[name]; !ok && !wildcard {
			continue
		}
		if v, ok := has[name]; ok && v == r.r.version {
			continue
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil
	}
	// Built under the lock: the frames out points into stay held.
	return newDeltaFrame(typeURL, c.cacheNonceLocked(), out, nil)
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
