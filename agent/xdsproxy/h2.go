package xdsproxy

import (
	"context"
	"fmt"
	"io"

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

// h2Up is a stream to the control plane on the proxy's shared connection.
type h2Up struct {
	connUse
	cs      *h2grpc.ClientStream
	scratch []byte
}

func (u *h2Up) SendMsg(m proto.Message) error {
	var err error
	if u.scratch, err = writeMessage(u.cs, m, u.scratch); err != nil {
		return u.check(err)
	}
	return u.check(u.cs.Flush())
}

func (u *h2Up) RecvFrame(delta bool) (*frame, error) {
	f, err := recvFrame(u.cs, delta)
	if err == nil && f.growing() {
		// A growing response that fails (or turns out malformed) while it
		// is filled, after RecvFrame returned, is the upstream's failure
		// too. Noted before the frame is aborted: that fails Envoy's
		// stream, which would make it look like the agent's doing.
		f.g.failed = func(err error) { _ = u.check(err) }
	}
	return f, u.check(err)
}

func (u *h2Up) Close() { u.release() }

// openH2 opens an ADS stream with the ClusterID and XDS_HEADER_* metadata
// and the token (read afresh) on the shared connection, dialing one (TLS
// root read afresh) if there is none or the shared one turns out dead.
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
	dial := func() (io.Closer, error) {
		dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
		defer cancel()
		conn, err := h2grpc.Dial(dctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", p.cfg.DiscoveryAddress, err)
		}
		return conn, nil
	}
	// A kept connection may have died while idle (GOAWAY, keepalive): then
	// dial once more at once rather than wait for a backoff.
	for attempt := 0; ; attempt++ {
		c, err := p.sharedConn(dial)
		if err != nil {
			return nil, err
		}
		conn := c.(*h2grpc.ClientConn)
		sctx, cancel := context.WithCancel(ctx)
		cs, err := conn.NewStream(sctx, method, md)
		if err != nil {
			cancel()
			p.dropConn(conn)
			if attempt == 0 && ctx.Err() == nil {
				continue
			}
			return nil, fmt.Errorf("open stream to %s: %w", p.cfg.DiscoveryAddress, err)
		}
		p.log.Debug("upstream stream open", zap.String("address", p.cfg.DiscoveryAddress), zap.String("transport", TransportCutThrough))
		return &h2Up{connUse: connUse{p: p, ctx: ctx, conn: conn, cancel: cancel}, cs: cs}, nil
	}
}
