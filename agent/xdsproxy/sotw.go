package xdsproxy

import (
	"slices"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
)

// onSotwRequest records an Envoy request and forwards it upstream when the
// control plane should see it. Never blocks.
func (s *session) onSotwRequest(req *discovery.DiscoveryRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.noteNodeLocked(req.GetNode())
	t := req.GetTypeUrl()
	st := s.state(t)

	var answered *frame
	if n := req.GetResponseNonce(); n != "" {
		answered = st.popInflight(n)
		if answered != nil {
			if req.GetErrorDetail() == nil && answered.gen != 0 {
				s.p.cache.acceptSotw(answered.hold())
			}
			// Only gen is read below, which outlives the buffers.
			answered.release()
		}
	}
	st.lastReq = req
	// NDS goes after Envoy's first LDS request (as Istio).
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
		// An ACK or NACK of this upstream stream's response: as is.
	case !slices.Equal(req.GetResourceNames(), st.upNames):
		// Answers a response from an earlier stream or from the cache,
		// but changes the subscription: send it as a fresh request.
		req = &discovery.DiscoveryRequest{TypeUrl: t, VersionInfo: req.GetVersionInfo(), ResourceNames: req.GetResourceNames()}
	default:
		// An ACK the control plane never asked for (its nonce is from an
		// earlier stream or from our cache): keep it local.
		return
	}
	st.upNames = req.GetResourceNames()
	s.queueUpLocked(t, req)
}
