package h2grpc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// echo echoes each length-prefixed message as it arrives, flushing after each.
func echo(st *ServerStream) error { return echoWith(st, false) }

// echoVec is echo with WriteBuffers, each message cut into pieces of
// uneven sizes (empty ones, pieces across DATA frame boundaries).
func echoVec(st *ServerStream) error { return echoWith(st, true) }

func echoWith(st *ServerStream, vec bool) error {
	for {
		msg, err := readMsg(st)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		b := frameMsg(msg)
		if !vec {
			if _, err := st.Write(b); err != nil {
				return err
			}
			if err := st.Flush(); err != nil {
				return err
			}
			continue
		}
		var bufs [][]byte
		for i, size := 0, 1; len(b) > 0; i++ {
			k := min(len(b), size)
			bufs = append(bufs, b[:k], nil)
			b = b[k:]
			size = size*3 + i
		}
		if err := st.WriteBuffers(bufs); err != nil {
			return err
		}
	}
}

func TestServerAgainstGRPCClient(t *testing.T) {
	tests := []struct {
		name string
		opts []grpc.DialOption
		msgs [][]byte
		vec  bool // the handler writes with WriteBuffers
	}{
		{name: "small", msgs: [][]byte{[]byte("a"), {}, payload(100)}},
		{name: "8 MB", msgs: [][]byte{payload(8 << 20), payload(3)}},
		// 64 KiB client windows: our Write blocks on flow control and
		// resumes on WINDOW_UPDATE.
		{name: "8 MB small windows", msgs: [][]byte{payload(8 << 20)},
			opts: []grpc.DialOption{grpc.WithInitialWindowSize(65535), grpc.WithInitialConnWindowSize(65535)}},
		{name: "WriteBuffers", msgs: [][]byte{[]byte("a"), {}, payload(8 << 20), payload(100)}, vec: true},
		{name: "WriteBuffers small windows", msgs: [][]byte{payload(8 << 20), payload(3)}, vec: true,
			opts: []grpc.DialOption{grpc.WithInitialWindowSize(65535), grpc.WithInitialConnWindowSize(65535)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var gotMethod string
			var gotHeader []string
			_, path := startServer(t, ServerConfig{Handle: func(st *ServerStream) error {
				gotMethod, gotHeader = st.Method(), st.Header()["x-test"]
				if tt.vec {
					return echoVec(st)
				}
				return echo(st)
			}})
			cc := grpcClient(t, path, tt.opts...)
			ctx := grpcMD(context.Background(), "x-test", "v1")
			cs, err := cc.NewStream(ctx, bidi, echoMethod)
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				for _, m := range tt.msgs {
					cs.SendMsg(&m)
				}
				cs.CloseSend()
			}()
			for i, m := range tt.msgs {
				var got []byte
				if err := cs.RecvMsg(&got); err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if !bytes.Equal(got, m) {
					t.Fatalf("message %d: got %d bytes, want %d (content differs)", i, len(got), len(m))
				}
			}
			var extra []byte
			if err := cs.RecvMsg(&extra); err != io.EOF {
				t.Fatalf("end of stream: %v, want io.EOF", err)
			}
			if gotMethod != echoMethod || len(gotHeader) != 1 || gotHeader[0] != "v1" {
				t.Errorf("handler saw method %q x-test %q", gotMethod, gotHeader)
			}
		})
	}
}

func TestServerStatus(t *testing.T) {
	tests := []struct {
		name    string
		method  string
		handler func(*ServerStream) error
		want    *status.Status
	}{
		{name: "status after data", method: echoMethod, handler: func(st *ServerStream) error {
			st.Write(frameMsg([]byte("x")))
			return status.Error(codes.FailedPrecondition, "bad: 100% \"wrong\"\nnaïve")
		}, want: status.New(codes.FailedPrecondition, "bad: 100% \"wrong\"\nnaïve")},
		{name: "trailers only", method: echoMethod, handler: func(*ServerStream) error {
			return status.Error(codes.PermissionDenied, "no")
		}, want: status.New(codes.PermissionDenied, "no")},
		{name: "plain error is Unknown", method: echoMethod, handler: func(*ServerStream) error {
			return errors.New("boom")
		}, want: status.New(codes.Unknown, "boom")},
		{name: "unknown method", method: "/no.Such/Method", handler: func(st *ServerStream) error {
			if st.Method() != echoMethod {
				return status.Errorf(codes.Unimplemented, "unknown method %s", st.Method())
			}
			return nil
		}, want: status.New(codes.Unimplemented, "unknown method /no.Such/Method")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, path := startServer(t, ServerConfig{Handle: tt.handler})
			cc := grpcClient(t, path)
			cs, err := cc.NewStream(context.Background(), bidi, tt.method)
			if err != nil {
				t.Fatal(err)
			}
			var err2 error
			for err2 == nil {
				var b []byte
				err2 = cs.RecvMsg(&b)
			}
			got := status.Convert(err2)
			if got.Code() != tt.want.Code() || got.Message() != tt.want.Message() {
				t.Errorf("client got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestServerClientCancel(t *testing.T) {
	cancelled := make(chan error, 1)
	_, path := startServer(t, ServerConfig{Handle: func(st *ServerStream) error {
		<-st.Context().Done()
		_, err := st.Read(make([]byte, 1))
		cancelled <- err
		return nil
	}})
	cc := grpcClient(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	cs, err := cc.NewStream(ctx, bidi, echoMethod)
	if err != nil {
		t.Fatal(err)
	}
	b := []byte("hi")
	cs.SendMsg(&b)
	time.Sleep(50 * time.Millisecond) // let the stream reach the server before the reset
	cancel()
	select {
	case err := <-cancelled:
		if status.Code(err) != codes.Canceled {
			t.Errorf("Read after the client's cancel = %v, want Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler's context never ended after the client cancelled")
	}
}

func TestServerStop(t *testing.T) {
	entered := make(chan struct{})
	returned := make(chan struct{})
	s, path := startServer(t, ServerConfig{Handle: func(st *ServerStream) error {
		close(entered)
		<-st.Context().Done()
		close(returned)
		return nil
	}})
	cc := grpcClient(t, path)
	cs, err := cc.NewStream(context.Background(), bidi, echoMethod)
	if err != nil {
		t.Fatal(err)
	}
	b := []byte("hi")
	cs.SendMsg(&b)
	<-entered
	s.Stop()
	select {
	case <-returned:
	default:
		t.Fatal("Stop returned before the handler")
	}
	if err := cs.RecvMsg(&b); status.Code(err) != codes.Unavailable {
		t.Errorf("client after Stop: %v, want Unavailable", err)
	}
}

func TestServerParallelStreams(t *testing.T) {
	_, path := startServer(t, ServerConfig{Handle: echo})
	cc := grpcClient(t, path)
	const n = 50
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cs, err := cc.NewStream(context.Background(), bidi, echoMethod)
			if err != nil {
				t.Error(err)
				return
			}
			for j := range 5 {
				m := []byte(fmt.Sprintf("stream %d message %d", i, j))
				m = append(m, payload(i*1000)...)
				if err := cs.SendMsg(&m); err != nil {
					t.Error(err)
					return
				}
				var got []byte
				if err := cs.RecvMsg(&got); err != nil || !bytes.Equal(got, m) {
					t.Errorf("stream %d message %d: %v (equal %v)", i, j, err, bytes.Equal(got, m))
					return
				}
			}
			cs.CloseSend()
			var b []byte
			if err := cs.RecvMsg(&b); err != io.EOF {
				t.Errorf("stream %d end: %v", i, err)
			}
		}()
	}
	wg.Wait()
}

func TestServerRefusesBeyondMaxConcurrentStreams(t *testing.T) {
	release := make(chan struct{})
	_, path := startServer(t, ServerConfig{MaxConcurrentStreams: 1, Handle: func(st *ServerStream) error {
		select {
		case <-release:
		case <-st.Context().Done():
		}
		return nil
	}})
	// Our own client honours the advertised limit: the second stream waits.
	cc := dial(t, DialConfig{Address: path, Dialer: unixDialer})
	cs1, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := cc.NewStream(ctx, echoMethod, nil); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("second NewStream under MAX_CONCURRENT_STREAMS=1: %v, want DeadlineExceeded", err)
	}
	close(release)
	if _, err := cs1.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("first stream: %v", err)
	}
	cs2, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatalf("NewStream once a slot is free: %v", err)
	}
	cs2.CloseSend()
	cs2.Read(make([]byte, 1))
}
