package xdsproxy

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// The session moves messages between two streams and does not care how
// they are carried: over grpc-go (store and forward: grpc hands over whole
// messages only), or over the agent's own HTTP/2 transport, which forwards
// large responses while they arrive (cutthrough.go).

// downstream is Envoy's stream.
type downstream interface {
	Context() context.Context
	RecvMsg(m proto.Message) error
	// SendFrame writes f, following it while it grows; errFrameAborted
	// means nothing was written.
	SendFrame(f *frame) error
}

// upstream is a stream to the control plane.
type upstream interface {
	SendMsg(m proto.Message) error
	// RecvFrame returns the next response; a growing one must be filled
	// (f.g.fill) before the next call.
	RecvFrame(delta bool) (*frame, error)
	// Close ends the stream (and its connection, unless a healthy one is
	// kept for the next stream).
	Close()
}

// grpcDown is Envoy's stream served by grpc-go.
type grpcDown struct{ grpc.ServerStream }

func (d grpcDown) RecvMsg(m proto.Message) error { return d.ServerStream.RecvMsg(m) }

// SendFrame sends a whole frame: frames grow only on the cut-through
// transport, whose Envoy side is h2Down.
func (d grpcDown) SendFrame(f *frame) error { return d.SendMsg(f) }

// grpcUp is an upstream stream over grpc-go, on the proxy's shared
// connection.
type grpcUp struct {
	connUse
	stream grpc.ClientStream
}

func (u *grpcUp) SendMsg(m proto.Message) error { return u.check(u.stream.SendMsg(m)) }

func (u *grpcUp) RecvFrame(delta bool) (*frame, error) {
	f := &frame{delta: delta}
	if err := u.check(u.stream.RecvMsg(f)); err != nil {
		return nil, err
	}
	return f, nil
}

func (u *grpcUp) Close() { u.release() }
