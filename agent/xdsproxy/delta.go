package xdsproxy

import (
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
)

// onDeltaRequest records an Envoy request (subscription changes, ACK/NACK)
// and forwards it upstream when the control plane should see it. Never
// blocks.
func (s *session) onDeltaRequest(req *discovery.DeltaDiscoveryRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noteNodeLocked(req.GetNode())
	t := req.GetTypeUrl()
	_, seen := s.types[t]
	st := s.state(t)
	if !seen {
		// The first request of a type: an empty subscription is the legacy
		// wildcard, and Envoy says what it still holds from a previous
		// stream.
		st.wildcard = len(req.GetResourceNamesSubscribe()) == 0
		for k, v := range req.GetInitialResourceVersions() {
			st.has[k] = v
		}
	}
	for _, n := range req.GetResourceNamesSubscribe() {
		if n == "*" {
			st.wildcard = true
		} else {
			st.subs[n] = struct{}{}
		}
	}
	for _, n := range req.GetResourceNamesUnsubscribe() {
		if n == "*" {
			st.wildcard = false
		} else {
			delete(st.subs, n)
			delete(st.has, n)
		}
	}

	var answered *frame
	if n := req.GetResponseNonce(); n != "" {
		answered = st.popInflight(n)
		if answered != nil && req.GetErrorDetail() == nil {
			for _, r := range answered.resources {
				st.has[r.name] = r.version
			}
			for _, name := range answered.removed {
				delete(st.has, name)
			}
			if answered.gen != 0 {
				s.p.cache.acceptDelta(answered)
			}
		}
		if answered != nil {
			// Only gen is read below, which outlives the buffers.
			answered.release()
		}
	}
	defer func() {
		if t == listenerType {
			s.requestNDSLocked()
		}
	}()
	if !s.connected {
		if s.p.unreachable.Load() {
			s.serveCachedLocked()
		}
		return
	}
	switch {
	case req.GetResponseNonce() == "":
	case answered != nil && answered.gen == s.gen:
	case len(req.GetResourceNamesSubscribe())+len(req.GetResourceNamesUnsubscribe()) > 0:
		// Answers a response from an earlier stream or from the cache, but
		// changes the subscription: forward the change only.
		req = &discovery.DeltaDiscoveryRequest{
			TypeUrl:                  t,
			ResourceNamesSubscribe:   req.GetResourceNamesSubscribe(),
			ResourceNamesUnsubscribe: req.GetResourceNamesUnsubscribe(),
		}
	default:
		return // an ACK the control plane never asked for
	}
	s.queueUpLocked(t, req)
}
