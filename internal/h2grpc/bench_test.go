package h2grpc

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
)

// pushSize is about a 3000-service ADS push.
const pushSize = 7 << 20

// pushHandler answers every request message with one pushSize message.
func pushHandler(_ any, ss grpc.ServerStream) error {
	resp := payload(pushSize)
	for {
		var b []byte
		if err := ss.RecvMsg(&b); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(&resp); err != nil {
			return err
		}
	}
}

func ourPushHandler(st *ServerStream) error {
	resp := frameMsg(payload(pushSize))
	for {
		if _, err := readMsg(st); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		if _, err := st.Write(resp); err != nil {
			return err
		}
		if err := st.Flush(); err != nil {
			return err
		}
	}
}

// BenchmarkRelay measures one 7 MB response per iteration (request → whole
// response received), each of our sides against grpc-go, and grpc-go on both
// sides for comparison. MB/s is the figure to compare.
func BenchmarkRelay(b *testing.B) {
	req := []byte("req")
	b.Run("grpc-server/h2grpc-client/tcp", func(b *testing.B) {
		addr := startGRPCServer(b, pushHandler)
		cc := dial(b, DialConfig{Address: addr})
		cs, err := cc.NewStream(context.Background(), echoMethod, nil)
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 5+pushSize)
		b.SetBytes(pushSize)
		b.ResetTimer()
		for range b.N {
			cs.Write(frameMsg(req))
			cs.Flush()
			if _, err := io.ReadFull(cs, buf); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		cs.CloseSend()
		io.Copy(io.Discard, cs)
	})
	b.Run("grpc-server/grpc-client/tcp", func(b *testing.B) {
		addr := startGRPCServer(b, pushHandler)
		benchGRPCClient(b, "passthrough:///"+addr, req)
	})
	b.Run("h2grpc-server/grpc-client/unix", func(b *testing.B) {
		_, path := startServer(b, ServerConfig{Handle: ourPushHandler})
		benchGRPCClient(b, "unix://"+path, req)
	})
	b.Run("grpc-server/grpc-client/unix", func(b *testing.B) {
		path := filepath.Join(b.TempDir(), "g.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			b.Fatal(err)
		}
		s := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(pushHandler))
		go s.Serve(l)
		defer s.Stop()
		benchGRPCClient(b, "unix://"+path, req)
	})
}

func benchGRPCClient(b *testing.B, target string, req []byte) {
	cc := grpcClientTarget(b, target)
	cs, err := cc.NewStream(context.Background(), bidi, echoMethod)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(pushSize)
	b.ResetTimer()
	for range b.N {
		if err := cs.SendMsg(&req); err != nil {
			b.Fatal(err)
		}
		var resp []byte
		if err := cs.RecvMsg(&resp); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	cs.CloseSend()
	var x []byte
	cs.RecvMsg(&x)
}
