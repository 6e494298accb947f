package sds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"strconv"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// SecretTypeURL is the type of every SDS resource.
const SecretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// StreamSecrets serves one SotW SDS stream: Envoy names the secrets it
// wants, gets each one as soon as it exists, and again whenever it changes.
func (s *Server) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	ctx := stream.Context()
	poke, cancel := s.store.subscribe()
	defer cancel()

	reqs := make(chan *discoveryv3.DiscoveryRequest)
	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()

	st := &sdsStream{srv: s, stream: stream, sent: map[string]uint64{}, log: s.log.With(zap.String("stream", newNonce()[:8]))}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-recvErr:
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		case req := <-reqs:
			if err := st.handle(req); err != nil {
				return err
			}
		case <-poke:
			if err := st.push(); err != nil {
				return err
			}
		}
	}
}

// DeltaSecrets is not served, as Istio: Envoy's SDS uses SotW.
func (s *Server) DeltaSecrets(grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	return status.Error(codes.Unimplemented, "DeltaSecrets is not served; use StreamSecrets")
}

// FetchSecrets is not served, as Istio.
func (s *Server) FetchSecrets(context.Context, *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	return nil, status.Error(codes.Unimplemented, "FetchSecrets is not served; use StreamSecrets")
}

var _ secretv3.SecretDiscoveryServiceServer = (*Server)(nil)

// sdsStream is the state of one stream.
type sdsStream struct {
	srv    *Server
	stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	log    *zap.Logger

	names     []string          // subscribed, in request order
	sent      map[string]uint64 // store version last sent per name
	lastNonce string
}

func (st *sdsStream) handle(req *discoveryv3.DiscoveryRequest) error {
	if req.GetTypeUrl() != "" && req.GetTypeUrl() != SecretTypeURL {
		return status.Errorf(codes.InvalidArgument, "SDS serves %s, not %s", SecretTypeURL, req.GetTypeUrl())
	}
	if req.GetResponseNonce() != "" && req.GetResponseNonce() != st.lastNonce {
		// An answer to a response that has been superseded: the newer one
		// will be acknowledged on its own.
		st.log.Debug("ignoring request with stale nonce", zap.String("nonce", req.GetResponseNonce()))
		return nil
	}
	if req.GetErrorDetail() != nil {
		st.srv.metrics.nacks.Inc()
		st.log.Warn("Envoy rejected secrets",
			zap.Strings("resources", req.GetResourceNames()), zap.String("version", req.GetVersionInfo()),
			zap.String("error", req.GetErrorDetail().GetMessage()))
		return nil
	}

	want := map[string]bool{}
	for _, n := range req.GetResourceNames() {
		want[n] = true
		if _, subscribed := st.sent[n]; subscribed {
			continue
		}
		if err := st.srv.prepare(n); err != nil {
			st.log.Error("cannot serve secret", zap.String("resource", n), zap.Error(err))
			return status.Error(codes.FailedPrecondition, err.Error())
		}
		st.sent[n] = 0
	}
	for n := range st.sent {
		if !want[n] {
			delete(st.sent, n)
		}
	}
	st.names = req.GetResourceNames()
	return st.push()
}

// push sends every subscribed secret whose version differs from what this
// stream last sent. Secrets not ready yet are sent once they are.
func (st *sdsStream) push() error {
	var (
		res     []*anypb.Any
		pushed  []string
		version uint64
	)
	for _, n := range st.names {
		e, ok := st.srv.store.get(n)
		if !ok || e.version == st.sent[n] {
			continue
		}
		a, err := anypb.New(e.secret)
		if err != nil {
			return status.Errorf(codes.Internal, "encode secret %s: %v", n, err)
		}
		res = append(res, a)
		pushed = append(pushed, n)
		st.sent[n] = e.version
		version = max(version, e.version)
	}
	if len(res) == 0 {
		return nil
	}
	st.lastNonce = newNonce()
	resp := &discoveryv3.DiscoveryResponse{
		VersionInfo: strconv.FormatUint(version, 10),
		Resources:   res,
		TypeUrl:     SecretTypeURL,
		Nonce:       st.lastNonce,
	}
	if err := st.stream.Send(resp); err != nil {
		return err
	}
	st.log.Info("pushed secrets", zap.Strings("resources", pushed), zap.String("version", resp.VersionInfo))
	return nil
}

// prepare checks that a resource name is one this server knows, loading it
// if it is a file.
func (s *Server) prepare(name string) error {
	switch name {
	case WorkloadResource, RootResource:
		return nil
	}
	ok, err := s.files.ensure(name)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("unknown SDS resource " + strconv.Quote(name) + ": this agent serves default, ROOTCA, file-cert:<cert>~<key>, file-root:<path> and file-root:system")
	}
	return nil
}

func newNonce() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
