package xdsproxy

import (
	"context"
	"fmt"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/outrigger-mesh/outrigger/internal/h2grpc"
)

// The cut-through transport: the agent's own HTTP/2 (internal/h2grpc) on
// both sides, so a response's bytes are relayed while they arrive.

// newH2Server is the socket's server on the cut-through transport.
func (p *Proxy) newH2Server() *h2grpc.Server {
	return h2grpc.NewServer(h2grpc.ServerConfig{
		Handle:            p.handleH2,
		KeepaliveInterval: p.cfg.KeepaliveInterval,
		KeepaliveTimeout:  p.cfg.KeepaliveTimeout,
		Log:               p.log.Named("h2"),
	})
}

func (p *Proxy) handleH2(st *h2grpc.ServerStream) error {
	switch st.Method() {
	case adsSotwMethod:
		return p.serve(&h2Down{st: st}, false)
	case adsDeltaMethod:
		return p.serve(&h2Down{st: st}, true)
	}
	return status.Errorf(codes.Unimplemented, "method %s: this socket serves only the aggregated discovery service (StreamAggregatedResources, DeltaAggregatedResources)", st.Method())
}

// h2Down is Envoy's stream on the agent's HTTP/2 server. RecvMsg and
// SendFrame are each called from one goroutine.
type h2Down struct {
	st      *h2grpc.ServerStream
	scratch []byte
}

func (d *h2Down) Context() context.Context { return d.st.Context() }

func (d *h2Down) RecvMsg(m proto.Message) error {
	var err error
	d.scratch, err = readMessage(d.st, m, d.scratch)
	return err
}

func (d *h2Down) SendFrame(f *frame) error { return writeFrame(d.st, f) }

// h2Up is a stream to the control plane on its own connection.
type h2Up struct {
	conn    *h2grpc.ClientConn
	cs      *h2grpc.ClientStream
	scratch []byte
}

func (u *h2Up) SendMsg(m proto.Message) error {
	var err error
	if u.scratch, err = writeMessage(u.cs, m, u.scratch); err != nil {
		return err
	}
	return u.cs.Flush()
}

func (u *h2Up) RecvFrame(delta bool) (*frame, error) { return recvFrame(u.cs, delta) }

func (u *h2Up) Close() { _ = u.conn.Close() }

// openH2 connects (TLS root and token read afresh) and opens an ADS stream
// with the ClusterID and XDS_HEADER_* metadata.
func (p *Proxy) openH2(ctx context.Context, method string) (upstream, error) {
	cfg := h2grpc.DialConfig{
		Address:           p.cfg.DiscoveryAddress,
		KeepaliveInterval: p.cfg.KeepaliveInterval,
		KeepaliveTimeout:  p.cfg.KeepaliveTimeout,
		Window:            upstreamWindow,
		Log:               p.log.Named("h2"),
	}
	md := p.streamMetadata()
	if !p.cfg.Plaintext {
		tc, err := p.tlsConfig()
		if err != nil {
			return nil, err
		}
		cfg.TLS = tc
		tok, _ := (&tokenCreds{p: p}).GetRequestMetadata(ctx)
		for k, v := range tok {
			md[k] = v
		}
	}
	dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	conn, err := h2grpc.Dial(dctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", p.cfg.DiscoveryAddress, err)
	}
	cs, err := conn.NewStream(ctx, method, md)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("open stream to %s: %w", p.cfg.DiscoveryAddress, err)
	}
	p.log.Debug("upstream stream open", zap.String("address", p.cfg.DiscoveryAddress), zap.String("transport", TransportCutThrough))
	return &h2Up{conn: conn, cs: cs}, nil
}
