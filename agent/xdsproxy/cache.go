package xdsproxy

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// compactMin is the size from which the cache compresses what it keeps.
// Smaller responses stay as they arrived.
const compactMin = 64 << 10

// lastGood keeps, per type, the configuration Envoy last accepted (ACKed)
// from the control plane. It outlives Envoy's streams: an Envoy restarted
// during a control plane outage is served from it.
//
// SotW keeps the accepted response per type; Delta keeps the accepted
// resources per type and name. An accepted response is first kept as the
// frame it arrived in (a reference: one per SotW type, one per Delta
// resource), so accepting costs no copy on Envoy's path. Then, in the
// background, large ones are compressed (flate) and the frame released:
// what is kept is cold (read only when the control plane is unreachable),
// and keeping it raw would double the agent's memory while the next push
// of the same type arrives.
type lastGood struct {
	mu    sync.Mutex
	sotw  map[string]cachedResource // the whole response: r.off 0, r.n its size
	delta map[string]map[string]cachedResource
	seq   uint64

	// Background compaction: at most one goroutine, rerun while dirty.
	dirty, running, closed bool
	wg                     sync.WaitGroup
	// Reused by the compaction goroutine.
	zw   *flate.Writer
	zbuf bytes.Buffer

	// The name table's accepted version(s), for NDS requests after a
	// reconnect.
	ndsVersion  string
	ndsVersions map[string]string
}

// cachedResource is a kept resource (Delta) or response (SotW): bytes
// [r.off, r.off+r.n) of either a received frame, held, or the expansion of
// a compressed blob.
type cachedResource struct {
	f *frame
	z *blob
	r resourceRef
}

// blob is a flate-compressed run of cached bytes.
type blob struct {
	z []byte
	n int // expanded size
}

func (b *blob) expand() ([]byte, error) {
	out := make([]byte, b.n)
	if _, err := io.ReadFull(flate.NewReader(bytes.NewReader(b.z)), out); err != nil {
		return nil, fmt.Errorf("expand cached configuration: %w", err)
	}
	return out, nil
}

// appendTo appends the bytes; expanded memoizes blob expansions.
func (e cachedResource) appendTo(dst []byte, expanded map[*blob][]byte) ([]byte, error) {
	if e.f != nil {
		return e.f.appendRange(dst, e.r.off, e.r.n), nil
	}
	b, ok := expanded[e.z]
	if !ok {
		var err error
		if b, err = e.z.expand(); err != nil {
			return dst, err
		}
		expanded[e.z] = b
	}
	return append(dst, b[e.r.off:e.r.off+e.r.n]...), nil
}

func newLastGood() *lastGood {
	return &lastGood{sotw: map[string]cachedResource{}, delta: map[string]map[string]cachedResource{}, ndsVersions: map[string]string{}}
}

// cacheNonceLocked returns a nonce that cannot be mistaken for the control
// plane's: Envoy's ACKs of cached responses are recognised and kept local.
func (c *lastGood) cacheNonceLocked() string {
	c.seq++
	return "outrigger-cache-" + strconv.FormatUint(c.seq, 10)
}

// acceptSotw keeps f, taking over the caller's reference.
func (c *lastGood) acceptSotw(f *frame) {
	c.mu.Lock()
	old := c.sotw[f.typeURL]
	c.sotw[f.typeURL] = cachedResource{f: f, r: resourceRef{n: f.size}}
	c.scheduleLocked()
	c.mu.Unlock()
	if old.f != nil {
		old.f.release()
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
		if old, ok := m[r.name]; ok && old.f != nil {
			drop = append(drop, old.f)
		}
		m[r.name] = cachedResource{f: f.hold(), r: r}
	}
	for _, name := range f.removed {
		if old, ok := m[name]; ok {
			if old.f != nil {
				drop = append(drop, old.f)
			}
			delete(m, name)
		}
	}
	c.scheduleLocked()
	c.mu.Unlock()
	for _, old := range drop {
		old.release()
	}
}

// sotwFrame returns the accepted response for typeURL under a cache nonce,
// or nil.
func (c *lastGood) sotwFrame(typeURL string) (*frame, error) {
	c.mu.Lock()
	e, ok := c.sotw[typeURL]
	if !ok {
		c.mu.Unlock()
		return nil, nil
	}
	if e.f != nil {
		e.f.hold()
	}
	nonce := c.cacheNonceLocked()
	c.mu.Unlock()
	if e.f != nil {
		defer e.f.release()
		return e.f.withNonce(nonce), nil
	}
	b, err := e.z.expand()
	if err != nil {
		return nil, err
	}
	f, err := flatFrame(false, b)
	if err != nil {
		return nil, fmt.Errorf("cached configuration: %w", err)
	}
	return f.withNonce(nonce), nil
}

// deltaFrame returns the accepted resources of typeURL that the subscription
// covers and that Envoy does not already have at that version, or nil.
func (c *lastGood) deltaFrame(typeURL string, wildcard bool, subs map[string]struct{}, has map[string]string) (*frame, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []cachedResource
	for name, e := range c.delta[typeURL] {
		if _, ok := subs[name]; !ok && !wildcard {
			continue
		}
		if v, ok := has[name]; ok && v == e.r.version {
			continue
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return nil, nil
	}
	// Built under the lock: the frames out points into stay held.
	return newDeltaFrame(typeURL, c.cacheNonceLocked(), out, nil)
}

// scheduleLocked makes the compaction goroutine run (again).
func (c *lastGood) scheduleLocked() {
	c.dirty = true
	if c.running || c.closed {
		return
	}
	c.running = true
	c.wg.Add(1)
	go c.compactLoop()
}

// close waits for the compaction goroutine; nothing is compacted after.
func (c *lastGood) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.wg.Wait()
}

func (c *lastGood) compactLoop() {
	defer c.wg.Done()
	for {
		c.mu.Lock()
		if !c.dirty || c.closed {
			c.running = false
			c.mu.Unlock()
			return
		}
		c.dirty = false
		var sotw, delta []string
		for t, e := range c.sotw {
			if e.f != nil && e.f.size >= compactMin {
				sotw = append(sotw, t)
			}
		}
		for t := range c.delta {
			delta = append(delta, t)
		}
		c.mu.Unlock()
		for _, t := range sotw {
			c.compactSotw(t)
		}
		for _, t := range delta {
			c.compactDelta(t)
		}
	}
}

// deflate compresses what write writes.
func (c *lastGood) deflate(write func(w io.Writer) error) (*blob, error) {
	c.zbuf.Reset()
	if c.zw == nil {
		zw, err := flate.NewWriter(&c.zbuf, flate.BestSpeed)
		if err != nil {
			return nil, err
		}
		c.zw = zw
	} else {
		c.zw.Reset(&c.zbuf)
	}
	cw := &countWriter{w: c.zw}
	if err := write(cw); err != nil {
		return nil, err
	}
	if err := c.zw.Close(); err != nil {
		return nil, err
	}
	return &blob{z: bytes.Clone(c.zbuf.Bytes()), n: cw.n}, nil
}

type countWriter struct {
	w io.Writer
	n int
}

func (w *countWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.n += n
	return n, err
}

func (c *lastGood) compactSotw(t string) {
	c.mu.Lock()
	e := c.sotw[t]
	if e.f == nil {
		c.mu.Unlock()
		return
	}
	f := e.f.hold()
	c.mu.Unlock()
	defer f.release()
	z, err := c.deflate(func(w io.Writer) error { return f.writeRange(w, 0, f.size) })
	if err != nil {
		return // stays as it is
	}
	c.mu.Lock()
	if c.sotw[t].f != f {
		c.mu.Unlock()
		return // replaced meanwhile
	}
	c.sotw[t] = cachedResource{z: z, r: resourceRef{n: f.size}}
	c.mu.Unlock()
	f.release() // the cache's reference
}

// compactDelta compresses the resources of t still kept in frames into one
// blob, once those frames add up to compactMin.
func (c *lastGood) compactDelta(t string) {
	type item struct {
		name string
		e    cachedResource
		off  int
	}
	held := map[*frame]bool{}
	size := 0
	c.mu.Lock()
	items := make([]item, 0, len(c.delta[t]))
	for name, e := range c.delta[t] {
		if e.f == nil {
			continue
		}
		items = append(items, item{name: name, e: e})
		if !held[e.f] {
			held[e.f] = true
			size += e.f.size
			e.f.hold()
		}
	}
	c.mu.Unlock()
	defer func() {
		for f := range held {
			f.release()
		}
	}()
	if size < compactMin {
		return
	}
	// By name: similar resources side by side compress best.
	slices.SortFunc(items, func(a, b item) int { return strings.Compare(a.name, b.name) })
	z, err := c.deflate(func(w io.Writer) error {
		off := 0
		for i := range items {
			items[i].off = off
			if err := items[i].e.f.writeRange(w, items[i].e.r.off, items[i].e.r.n); err != nil {
				return err
			}
			off += items[i].e.r.n
		}
		return nil
	})
	if err != nil {
		return
	}
	var drop []*frame
	c.mu.Lock()
	m := c.delta[t]
	for _, it := range items {
		if cur, ok := m[it.name]; ok && cur.f == it.e.f && cur.r.off == it.e.r.off {
			r := it.e.r
			r.off = it.off
			m[it.name] = cachedResource{z: z, r: r}
			drop = append(drop, it.e.f)
		}
	}
	c.mu.Unlock()
	for _, f := range drop {
		f.release()
	}
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
