package xdsproxy

import (
	"errors"
	"fmt"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"go.uber.org/zap"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// noteNodeLocked keeps the node from Envoy's first request: the proxy sends
// it on every new upstream stream.
func (s *session) noteNodeLocked(n *core.Node) {
	if s.node == nil && n != nil {
		s.node = n
		s.cond.Broadcast()
	}
}

// requestNDSLocked asks for the DNS name table after Envoy's first LDS
// request on this stream, when the DNS proxy is on (as Istio).
func (s *session) requestNDSLocked() {
	if s.wantNDS || s.p.cfg.OnNameTable == nil {
		return
	}
	s.wantNDS = true
	s.queueNDSRequestLocked()
}

func (s *session) queueNDSRequestLocked() {
	if s.delta {
		s.queueUpLocked(nds.TypeURL, &discovery.DeltaDiscoveryRequest{
			TypeUrl:                 nds.TypeURL,
			InitialResourceVersions: s.p.cache.ndsDeltaVersions(),
		})
		return
	}
	s.queueUpLocked(nds.TypeURL, &discovery.DiscoveryRequest{
		TypeUrl:     nds.TypeURL,
		VersionInfo: s.p.cache.ndsSotwVersion(),
	})
}

// handleNDS hands a name table to the DNS proxy and answers the control
// plane itself: the table never goes to Envoy. An empty response keeps the
// current table (DNS keeps answering through outages too).
func (s *session) handleNDS(f *frame) {
	err := s.applyNameTable(f)
	if err != nil {
		s.log.Warn("rejecting the DNS name table", zap.Error(err))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.delta {
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: nds.TypeURL, ResponseNonce: f.nonce}
		if err != nil {
			req.ErrorDetail = &status.Status{Code: int32(codes.Internal), Message: err.Error()}
		} else {
			s.p.cache.acceptNDSDelta(f)
		}
		s.queueUpLocked(nds.TypeURL, req)
		return
	}
	req := &discovery.DiscoveryRequest{TypeUrl: nds.TypeURL, ResponseNonce: f.nonce, VersionInfo: f.version}
	if err != nil {
		req.VersionInfo = s.p.cache.ndsSotwVersion()
		req.ErrorDetail = &status.Status{Code: int32(codes.Internal), Message: err.Error()}
	} else {
		s.p.cache.setNDSVersion(f.version)
	}
	s.queueUpLocked(nds.TypeURL, req)
}

var errNoHandler = errors.New("no DNS name table handler")

func (s *session) applyNameTable(f *frame) error {
	if len(f.resources) == 0 {
		return nil
	}
	if s.p.cfg.OnNameTable == nil {
		return errNoHandler
	}
	b, err := f.resourceValue(0)
	if err != nil {
		return fmt.Errorf("name table envelope: %w", err)
	}
	t, err := nds.Unmarshal(b)
	if err != nil {
		return fmt.Errorf("decode name table: %w", err)
	}
	if err := s.p.cfg.OnNameTable(t); err != nil {
		return fmt.Errorf("apply name table: %w", err)
	}
	return nil
}
