package xdsproxy

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

const (
	listenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	// maxInflight bounds the responses remembered per type while waiting
	// for Envoy's ACK; Envoy answers each one, so this only guards against
	// a misbehaving client.
	maxInflight = 16
)

// forwardable tells which responses go to Envoy: Envoy's own types and
// ztunnel's workload type. Anything else the control plane sends is for
// some other consumer and is dropped.
func forwardable(typeURL string) bool {
	return strings.HasPrefix(typeURL, "type.googleapis.com/envoy.") || strings.Contains(typeURL, "istio.workload.Workload")
}

// session is one Envoy stream and the upstream streams that serve it.
//
// Four goroutines move data, each in one direction, so that reading from
// Envoy never waits on anything: requests are merged into a per-type
// pending slot (bounded by the number of types) and responses wait in a
// per-type slot. A slow Envoy stops the upstream reader (Delta) or makes
// newer SotW responses replace older unsent ones; memory stays bounded
// either way.
type session struct {
	p      *Proxy
	log    *zap.Logger
	delta  bool
	id     uint64
	down   downstream
	ctx    context.Context
	cancel context.CancelCauseFunc

	mu      sync.Mutex
	cond    *sync.Cond // broadcast on: node known, response slot freed, ctx done
	node    *core.Node
	types   map[string]*typeState
	order   []string // type URLs in the order Envoy first asked for them
	wantNDS bool

	// Upstream side. gen identifies the current upstream stream (0: none).
	gen       uint64
	genSeq    uint64
	connected bool
	nodeSent  bool
	upQ       []string
	upPend    map[string]proto.Message
	upWake    chan struct{}
	awaiting  time.Time // first unanswered subscription request (zero: none)

	// Downstream side.
	downQ    []string
	downPend map[string]*frame
	downWake chan struct{}
}

// typeState is what the session knows about one type.
type typeState struct {
	// SotW: Envoy's latest request (resource names and accepted version).
	lastReq *discovery.DiscoveryRequest
	// Names last sent upstream on the current generation (SotW).
	upNames []string
	// Responses sent to Envoy and not yet ACKed or NACKed.
	inflight []*frame
	// Envoy got at least one response of this type on this stream.
	envoyGot    bool
	cacheServed bool

	// Delta: Envoy's subscription and the versions it holds.
	wildcard bool
	subs     map[string]struct{}
	has      map[string]string
}

func newSession(p *Proxy, down downstream, delta bool) *session {
	ctx, cancel := context.WithCancelCause(down.Context())
	s := &session{
		p: p, delta: delta, down: down, ctx: ctx, cancel: cancel,
		types:    map[string]*typeState{},
		upPend:   map[string]proto.Message{},
		upWake:   make(chan struct{}, 1),
		downPend: map[string]*frame{},
		downWake: make(chan struct{}, 1),
	}
	s.cond = sync.NewCond(&s.mu)
	mode := "sotw"
	if delta {
		mode = "delta"
	}
	s.log = p.log.With(zap.String("mode", mode))
	return s
}

func wake(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// run serves the stream until Envoy goes away, the stream is replaced, or
// the proxy stops. It returns nil when Envoy closed the stream itself.
func (s *session) run() error {
	s.log = s.log.With(zap.Uint64("stream", s.id))
	stop := context.AfterFunc(s.ctx, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer stop()

	// The two downstream goroutines are not waited for: they may sit in
	// Recv/Send on the Envoy stream, which grpc only releases once this
	// handler has returned.
	go s.readEnvoy()
	go s.writeEnvoy()

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.upstreamLoop()
	}()
	<-s.ctx.Done()
	wg.Wait()
	s.mu.Lock()
	s.releaseFramesLocked()
	s.mu.Unlock()
	err := context.Cause(s.ctx)
	if errors.Is(err, io.EOF) {
		return nil
	}
	if errors.Is(err, context.Canceled) && s.down.Context().Err() != nil {
		return nil // Envoy or the server went away
	}
	return err
}

// state returns the type's state, creating it in first-seen order.
func (s *session) state(typeURL string) *typeState {
	st := s.types[typeURL]
	if st == nil {
		st = &typeState{subs: map[string]struct{}{}, has: map[string]string{}}
		s.types[typeURL] = st
		s.order = append(s.order, typeURL)
	}
	return st
}

// readEnvoy receives Envoy's requests. Handling one never blocks.
func (s *session) readEnvoy() {
	for {
		var err error
		if s.delta {
			req := &discovery.DeltaDiscoveryRequest{}
			if err = s.down.RecvMsg(req); err == nil {
				s.p.metrics.envoyRequests.WithLabelValues(shortType(req.GetTypeUrl())).Inc()
				s.onDeltaRequest(req)
				continue
			}
		} else {
			req := &discovery.DiscoveryRequest{}
			if err = s.down.RecvMsg(req); err == nil {
				s.p.metrics.envoyRequests.WithLabelValues(shortType(req.GetTypeUrl())).Inc()
				s.onSotwRequest(req)
				continue
			}
		}
		// An Envoy that went away (its context ended) is no failure.
		if !errors.Is(err, io.EOF) && !expectedEnd(err) && s.down.Context().Err() == nil {
			s.log.Warn("Envoy stream failed", zap.Error(err))
		}
		s.cancel(err)
		return
	}
}

// writeEnvoy sends queued responses to Envoy, oldest type first.
func (s *session) writeEnvoy() {
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.downWake:
		}
		for {
			s.mu.Lock()
			if len(s.downQ) == 0 {
				s.mu.Unlock()
				break
			}
			t := s.downQ[0]
			s.downQ = s.downQ[1:]
			f := s.downPend[t]
			delete(s.downPend, t)
			st := s.state(t)
			// Recorded before sending: Envoy may ACK before Send returns.
			// The in-flight list takes over the slot's reference.
			st.inflight = append(st.inflight, f)
			if len(st.inflight) > maxInflight {
				st.inflight[0].release()
				st.inflight[0] = nil
				st.inflight = st.inflight[1:]
			}
			st.envoyGot = true
			s.cond.Broadcast() // a Delta slot is free again
			f.hold()           // for the send: an ACK may release the in-flight reference
			s.mu.Unlock()

			start := time.Now()
			err := s.down.SendFrame(f)
			f.release()
			if errors.Is(err, errFrameAborted) {
				s.log.Warn("dropped a response whose upstream stream failed before it was forwarded", zap.String("type", t))
				continue
			}
			if err != nil {
				s.cancel(err)
				return
			}
			if d := time.Since(start); d > 10*time.Second {
				s.log.Warn("slow send to Envoy", zap.String("type", t), zap.Duration("took", d))
			}
			source := "upstream"
			if f.gen == 0 {
				source = "cache"
			}
			s.p.metrics.envoyResponses.WithLabelValues(shortType(t), source).Inc()
		}
	}
}

// queueDownLocked hands a response to writeEnvoy, with the caller's
// reference (released here if the response is not queued). SotW responses
// replace an unsent one of the same type (state of the world: the newer one
// says it all). A Delta response waits until the slot is free, which stops
// the upstream reader: backpressure instead of an unbounded queue.
func (s *session) queueDownLocked(ctx context.Context, f *frame) bool {
	t := f.typeURL
	if s.delta {
		for s.downPend[t] != nil && ctx.Err() == nil {
			s.cond.Wait()
		}
		if ctx.Err() != nil {
			f.release()
			return false
		}
	}
	if old, ok := s.downPend[t]; ok {
		old.release()
		s.p.metrics.coalesced.WithLabelValues(shortType(t)).Inc()
	} else {
		s.downQ = append(s.downQ, t)
	}
	s.downPend[t] = f
	wake(s.downWake)
	return true
}

// queueUpLocked hands a request to the upstream writer, merged with any
// unsent request of the same type so the queue is bounded by the number of
// types. A SotW request replaces the previous one; Delta requests merge
// their subscription changes and keep the latest nonce.
func (s *session) queueUpLocked(typeURL string, req proto.Message) {
	if s.gen == 0 {
		return // not connected: the replay on connect carries the state
	}
	prev, ok := s.upPend[typeURL]
	if !ok {
		s.upQ = append(s.upQ, typeURL)
	} else if pd, isDelta := prev.(*discovery.DeltaDiscoveryRequest); isDelta {
		req = mergeDelta(pd, req.(*discovery.DeltaDiscoveryRequest))
	}
	s.upPend[typeURL] = req
	wake(s.upWake)
}

func mergeDelta(a, b *discovery.DeltaDiscoveryRequest) *discovery.DeltaDiscoveryRequest {
	out := &discovery.DeltaDiscoveryRequest{
		Node:                    a.GetNode(),
		TypeUrl:                 b.GetTypeUrl(),
		ResponseNonce:           b.GetResponseNonce(),
		ErrorDetail:             b.GetErrorDetail(),
		InitialResourceVersions: map[string]string{},
	}
	if out.ResponseNonce == "" {
		out.ResponseNonce, out.ErrorDetail = a.GetResponseNonce(), a.GetErrorDetail()
	}
	for k, v := range a.GetInitialResourceVersions() {
		out.InitialResourceVersions[k] = v
	}
	for k, v := range b.GetInitialResourceVersions() {
		out.InitialResourceVersions[k] = v
	}
	sub := map[string]bool{} // name -> subscribed (true) or unsubscribed (false)
	var order []string
	apply := func(names []string, v bool) {
		for _, n := range names {
			if _, ok := sub[n]; !ok {
				order = append(order, n)
			}
			sub[n] = v
		}
	}
	apply(a.GetResourceNamesSubscribe(), true)
	apply(a.GetResourceNamesUnsubscribe(), false)
	apply(b.GetResourceNamesSubscribe(), true)
	apply(b.GetResourceNamesUnsubscribe(), false)
	for _, n := range order {
		if sub[n] {
			out.ResourceNamesSubscribe = append(out.ResourceNamesSubscribe, n)
		} else {
			out.ResourceNamesUnsubscribe = append(out.ResourceNamesUnsubscribe, n)
		}
	}
	return out
}

// upstreamLoop keeps an upstream stream open for as long as Envoy's stream
// lives, reconnecting with jittered exponential backoff.
func (s *session) upstreamLoop() {
	// The node comes with Envoy's first request.
	s.mu.Lock()
	for s.node == nil && s.ctx.Err() == nil {
		s.cond.Wait()
	}
	s.mu.Unlock()
	attempt := 0
	for s.ctx.Err() == nil {
		answered, err := s.runUpstream()
		if s.ctx.Err() != nil {
			return
		}
		if answered {
			attempt = 0
		}
		s.p.unreachable.Store(true)
		s.mu.Lock()
		s.serveCachedLocked()
		s.mu.Unlock()
		d := backoffDelay(attempt, s.p.cfg.InitialBackoff, s.p.cfg.MaxBackoff, randInt64N)
		attempt++
		lvl := s.log.Warn
		if expectedEnd(err) {
			lvl = s.log.Info
		}
		lvl("upstream stream ended; reconnecting", zap.Error(err), zap.Duration("backoff", d))
		t := time.NewTimer(d)
		select {
		case <-s.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

var errStalled = errors.New("no response from the control plane within the stall timeout")

// runUpstream runs one upstream stream to its end. answered reports whether
// the control plane sent anything on it.
func (s *session) runUpstream() (answered bool, err error) {
	p := s.p
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	method := adsSotwMethod
	if s.delta {
		method = adsDeltaMethod
	}
	stream, err := p.openUpstream(ctx, method)
	if err != nil {
		p.metrics.connFailures.Inc()
		return false, err
	}
	defer stream.Close()

	s.mu.Lock()
	s.genSeq++
	s.gen = s.genSeq
	gen := s.gen
	s.connected, s.nodeSent = true, false
	s.awaiting = time.Time{}
	s.replayLocked()
	s.mu.Unlock()
	p.connected.Add(1)
	p.metrics.connected.Set(1)
	defer func() {
		s.mu.Lock()
		s.gen, s.connected = 0, false
		s.upQ, s.upPend = nil, map[string]proto.Message{}
		s.mu.Unlock()
		if p.connected.Add(-1) == 0 {
			p.metrics.connected.Set(0)
		}
	}()

	// The upstream reader may wait for a response slot; wake it when
	// this stream ends.
	stopWake := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	defer stopWake()
	var got sync.WaitGroup
	var answeredFlag bool
	errc := make(chan error, 3)
	got.Add(3)
	go func() { defer got.Done(); errc <- s.writeUpstream(ctx, stream) }()
	go func() {
		defer got.Done()
		a, err := s.readUpstream(ctx, stream, gen)
		answeredFlag = a
		errc <- err
	}()
	go func() { defer got.Done(); errc <- s.watchdog(ctx) }()
	err = <-errc
	cancel(err)
	got.Wait()
	if answeredFlag {
		kind := "error"
		if expectedEnd(err) || errors.Is(err, io.EOF) {
			kind = "cancelled"
		}
		p.metrics.connTerms.WithLabelValues(kind).Inc()
	} else {
		p.metrics.connFailures.Inc()
	}
	return answeredFlag, err
}

// writeUpstream sends queued requests; the first on a stream carries the
// node, since Envoy sends it only once per stream.
func (s *session) writeUpstream(ctx context.Context, stream upstream) error {
	for {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-s.upWake:
		}
		for {
			s.mu.Lock()
			if len(s.upQ) == 0 {
				s.mu.Unlock()
				break
			}
			t := s.upQ[0]
			s.upQ = s.upQ[1:]
			req := s.upPend[t]
			delete(s.upPend, t)
			if !s.nodeSent {
				req = withNode(req, s.node)
				s.nodeSent = true
			}
			if expectsAnswer(req) && s.awaiting.IsZero() {
				s.awaiting = time.Now()
			}
			s.mu.Unlock()
			if ce := s.log.Check(zap.DebugLevel, "request upstream"); ce != nil {
				ce.Write(zap.String("type", shortType(t)), zap.Bool("expectsAnswer", expectsAnswer(req)))
			}
			if err := stream.SendMsg(req); err != nil {
				return err
			}
			s.p.metrics.requests.WithLabelValues(shortType(t)).Inc()
		}
	}
}

func withNode(req proto.Message, node *core.Node) proto.Message {
	switch r := req.(type) {
	case *discovery.DiscoveryRequest:
		if r.Node == nil {
			c := proto.Clone(r).(*discovery.DiscoveryRequest)
			c.Node = node
			return c
		}
	case *discovery.DeltaDiscoveryRequest:
		if r.Node == nil {
			c := proto.Clone(r).(*discovery.DeltaDiscoveryRequest)
			c.Node = node
			return c
		}
	}
	return req
}

// expectsAnswer: a subscription request (no nonce) asks for a response;
// ACKs and NACKs do not.
func expectsAnswer(req proto.Message) bool {
	switch r := req.(type) {
	case *discovery.DiscoveryRequest:
		return r.GetResponseNonce() == ""
	case *discovery.DeltaDiscoveryRequest:
		return r.GetResponseNonce() == "" || len(r.GetResourceNamesSubscribe()) > 0
	}
	return false
}

// readUpstream receives responses and routes them: the name table to the
// DNS handler, Envoy's types to Envoy. A large response of Envoy's types
// may be queued for Envoy while it still arrives (cutthrough.go).
func (s *session) readUpstream(ctx context.Context, stream upstream, gen uint64) (answered bool, err error) {
	for {
		f, err := stream.RecvFrame(s.delta)
		if err != nil {
			return answered, err
		}
		answered = true
		f.gen = gen
		now := time.Now()
		s.p.lastConfig.Store(now.UnixNano())
		s.p.unreachable.Store(false)
		s.p.metrics.lastConfig.Set(float64(now.UnixNano()) / 1e9)
		s.mu.Lock()
		s.awaiting = time.Time{}
		s.mu.Unlock()

		if f.growing() {
			if err := s.forwardGrowing(ctx, f); err != nil {
				return answered, err
			}
			continue
		}
		s.logResponse(f)
		switch {
		case f.typeURL == nds.TypeURL:
			s.handleNDS(f)
			f.release()
		case !forwardable(f.typeURL):
			s.log.Error("dropping a response of a type Envoy does not take", zap.String("type", f.typeURL))
			f.release()
		default:
			s.mu.Lock()
			ok := s.queueDownLocked(ctx, f)
			s.mu.Unlock()
			if !ok {
				return answered, context.Cause(ctx)
			}
		}
	}
}

// forwardGrowing queues a response that is still arriving, then reads the
// rest of it. Its envelope is set under the session's lock before its last
// bytes can reach Envoy, so Envoy's answer always finds it.
func (s *session) forwardGrowing(ctx context.Context, f *frame) error {
	f.hold() // the filler's reference
	defer f.release()
	s.mu.Lock()
	ok := s.queueDownLocked(ctx, f)
	s.mu.Unlock()
	if !ok {
		f.abort(context.Cause(ctx))
		return context.Cause(ctx)
	}
	err := f.g.fill(func(env *frame) {
		s.mu.Lock()
		f.setEnvelope(env)
		s.mu.Unlock()
	})
	if err != nil {
		return err
	}
	s.logResponse(f)
	return nil
}

func (s *session) logResponse(f *frame) {
	s.p.metrics.responses.WithLabelValues(shortType(f.typeURL)).Inc()
	if ce := s.log.Check(zap.DebugLevel, "response from upstream"); ce != nil {
		s.mu.Lock()
		version, nonce, n := f.version, f.nonce, len(f.resources)
		s.mu.Unlock()
		ce.Write(zap.String("type", shortType(f.typeURL)), zap.String("version", version),
			zap.String("nonce", nonce), zap.Int("resources", n), zap.Int("bytes", f.size),
			zap.Bool("cutThrough", f.growing()))
	}
}

// watchdog replaces an upstream stream that stays silent while a request
// waits for an answer. Keepalive catches a dead connection; this catches a
// live connection whose stream is stuck (istio#57064, #39926).
func (s *session) watchdog(ctx context.Context) error {
	tick := s.p.cfg.StallTimeout / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-t.C:
		}
		s.mu.Lock()
		stalled := !s.awaiting.IsZero() && time.Since(s.awaiting) > s.p.cfg.StallTimeout
		s.mu.Unlock()
		if stalled {
			s.p.metrics.recycles.Inc()
			return errStalled
		}
	}
}

// replayLocked queues, on a new upstream stream, everything Envoy is
// subscribed to, with the versions Envoy holds, so the control plane sends
// what changed (or everything, as istiod does on a new stream).
func (s *session) replayLocked() {
	s.upQ, s.upPend = nil, map[string]proto.Message{}
	for _, t := range s.order {
		st := s.types[t]
		if s.delta {
			req := &discovery.DeltaDiscoveryRequest{TypeUrl: t, InitialResourceVersions: copyMap(st.has)}
			req.ResourceNamesSubscribe = sortedKeys(st.subs)
			if st.wildcard && len(st.subs) > 0 {
				req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, "*")
			}
			s.queueUpLocked(t, req)
			continue
		}
		if st.lastReq == nil {
			continue
		}
		req := &discovery.DiscoveryRequest{
			TypeUrl:       t,
			VersionInfo:   st.lastReq.GetVersionInfo(),
			ResourceNames: st.lastReq.GetResourceNames(),
		}
		st.upNames = req.ResourceNames
		s.queueUpLocked(t, req)
	}
	if s.wantNDS {
		s.queueNDSRequestLocked()
	}
}

// serveCachedLocked serves the last-known-good configuration for every type
// Envoy asked for and got nothing of on this stream: an Envoy restarted
// while the control plane is down becomes ready anyway. It is called when an
// upstream stream ends or fails, and on Envoy's requests while the control
// plane is known to be unreachable; not on a fresh stream while the control
// plane is up, which would push Envoy everything twice (the cached copy,
// then the control plane's).
func (s *session) serveCachedLocked() {
	if s.connected {
		return
	}
	for _, t := range s.order {
		st := s.types[t]
		if st.envoyGot || st.cacheServed || s.downPend[t] != nil || t == nds.TypeURL {
			continue
		}
		var f *frame
		var err error
		if s.delta {
			f, err = s.p.cache.deltaFrame(t, st.wildcard, st.subs, st.has)
		} else {
			f, err = s.p.cache.sotwFrame(t)
		}
		if err != nil {
			s.log.Error("cannot serve the last accepted configuration", zap.String("type", shortType(t)), zap.Error(err))
			continue
		}
		if f == nil {
			continue
		}
		st.cacheServed = true
		s.log.Info("control plane unreachable; serving Envoy the last accepted configuration",
			zap.String("type", shortType(t)), zap.Int("resources", len(f.resources)))
		s.queueDownLocked(s.ctx, f)
	}
}

// popInflight finds the response Envoy answers by nonce and forgets it and
// everything sent before it. The caller gets the list's reference of the
// answered frame.
func (st *typeState) popInflight(nonce string) *frame {
	for i, f := range st.inflight {
		if f.nonce == nonce {
			for _, older := range st.inflight[:i] {
				older.release()
			}
			clear(st.inflight[:i+1])
			st.inflight = st.inflight[i+1:]
			return f
		}
	}
	return nil
}

// releaseFramesLocked drops the session's references when it ends, so the
// buffers of responses Envoy never answered go back to the pool.
func (s *session) releaseFramesLocked() {
	for t, f := range s.downPend {
		f.release()
		delete(s.downPend, t)
	}
	s.downQ = nil
	for _, st := range s.types {
		for _, f := range st.inflight {
			f.release()
		}
		st.inflight = nil
	}
}

func copyMap(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func sortedKeys(m map[string]struct{}) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
