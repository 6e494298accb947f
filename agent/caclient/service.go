package caclient

import (
	"context"

	"google.golang.org/grpc"
)

// CertificateServer is the server side of IstioCertificateService. The test
// CA implements it; the agent itself only calls it.
type CertificateServer interface {
	CreateCertificate(ctx context.Context, req *Request) (*Response, error)
}

// RegisterCertificateServer adds srv to s under the Istio service name. The
// server must be built with grpc.ForceServerCodecV2(Codec{}).
func RegisterCertificateServer(s grpc.ServiceRegistrar, srv CertificateServer) {
	s.RegisterService(&serviceDesc, srv)
}

var serviceDesc = grpc.ServiceDesc{
	ServiceName: ServiceName,
	HandlerType: (*CertificateServer)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "CreateCertificate",
		Handler:    createCertificateHandler,
	}},
	Streams:  []grpc.StreamDesc{},
	Metadata: "security/v1alpha1/ca.proto",
}

func createCertificateHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := new(Request)
	if err := dec(in); err != nil {
		return nil, err
	}
	if interceptor == nil {
		return srv.(CertificateServer).CreateCertificate(ctx, in)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: CreateCertificateMethod}
	handler := func(ctx context.Context, req any) (any, error) {
		return srv.(CertificateServer).CreateCertificate(ctx, req.(*Request))
	}
	return interceptor(ctx, in, info, handler)
}
