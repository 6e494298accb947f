package h2grpc

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const echoMethod = "/test.Echo/Bidi"

// echoHandler echoes every message, then ends with the status given in the
// request metadata "want-code"/"want-msg" (OK when absent).
func echoHandler(_ any, ss grpc.ServerStream) error {
	md, _ := metadata.FromIncomingContext(ss.Context())
	ss.SetHeader(metadata.Pairs("seen-x-test", strings.Join(md.Get("x-test"), ",")))
	for {
		var b []byte
		if err := ss.RecvMsg(&b); err != nil {
			if err == io.EOF {
				break
			}
			return err
		}
		if err := ss.SendMsg(&b); err != nil {
			return err
		}
	}
	if c := md.Get("want-code"); len(c) > 0 {
		return status.Error(codes.NotFound, md.Get("want-msg")[0])
	}
	return nil
}

func TestClientAgainstGRPCServer(t *testing.T) {
	addr := startGRPCServer(t, echoHandler)
	cc := dial(t, DialConfig{Address: addr})
	tests := []struct {
		name string
		msgs [][]byte
		md   map[string]string
		want error
	}{
		{name: "small messages", msgs: [][]byte{[]byte("a"), {}, payload(1000)}, md: map[string]string{"X-Test": "v1"}},
		{name: "8 MB both ways", msgs: [][]byte{payload(8 << 20), payload(8<<20 + 3)}},
		{name: "status with percent-encoded message", msgs: [][]byte{[]byte("x")},
			md:   map[string]string{"want-code": "5", "want-msg": "not 100% here: naïve\ttab"},
			want: status.Error(codes.NotFound, "not 100% here: naïve\ttab")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs, err := cc.NewStream(context.Background(), echoMethod, tt.md)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { // write concurrently: 8 MB exceeds the windows both ways
				defer wg.Done()
				for _, m := range tt.msgs {
					if _, err := cs.Write(frameMsg(m)); err != nil {
						t.Errorf("Write: %v", err)
						return
					}
				}
				if err := cs.CloseSend(); err != nil {
					t.Errorf("CloseSend: %v", err)
				}
			}()
			for i, m := range tt.msgs {
				got, err := readMsg(cs)
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if !bytes.Equal(got, m) {
					t.Fatalf("message %d: got %d bytes, want %d (content differs)", i, len(got), len(m))
				}
			}
			_, err = cs.Read(make([]byte, 1))
			wg.Wait()
			want := tt.want
			if want == nil {
				want = io.EOF
			}
			if err == io.EOF || want == io.EOF {
				if err != want {
					t.Fatalf("end of stream: %v, want %v", err, want)
				}
				return
			}
			if diff := cmp.Diff(status.Convert(want).Proto().String(), status.Convert(err).Proto().String()); diff != "" {
				t.Errorf("status (-want +got):\n%s", diff)
			}
		})
	}
}

func TestClientMetadataSeen(t *testing.T) {
	got := make(chan metadata.MD, 1)
	addr := startGRPCServer(t, func(_ any, ss grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(ss.Context())
		got <- md
		return nil
	})
	cc := dial(t, DialConfig{Address: addr, Authority: "istiod.istio-system.svc:15012"})
	cs, err := cc.NewStream(context.Background(), echoMethod, map[string]string{"X-Test": "v1", "authorization": "Bearer t"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("Read = %v, want io.EOF", err)
	}
	md := <-got
	for k, want := range map[string]string{"x-test": "v1", "authorization": "Bearer t", ":authority": "istiod.istio-system.svc:15012", "content-type": "application/grpc"} {
		if v := md.Get(k); len(v) != 1 || v[0] != want {
			t.Errorf("server saw %s = %q, want %q", k, v, want)
		}
	}
}

func TestClientTrailersOnly(t *testing.T) {
	addr := startGRPCServer(t, func(any, grpc.ServerStream) error {
		return status.Error(codes.PermissionDenied, "denied: 50%")
	})
	cc := dial(t, DialConfig{Address: addr})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = cs.Read(make([]byte, 10))
	if s := status.Convert(err); s.Code() != codes.PermissionDenied || s.Message() != "denied: 50%" {
		t.Fatalf("Read = %v, want PermissionDenied \"denied: 50%%\"", err)
	}
	if _, err := cs.Write([]byte("late")); err != io.EOF {
		t.Errorf("Write after the end = %v, want io.EOF", err)
	}
}

func TestClientServerStopIsUnavailable(t *testing.T) {
	started := make(chan struct{})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		close(started)
		<-ss.Context().Done()
		return nil
	}))
	go s.Serve(l)
	defer s.Stop()
	cc := dial(t, DialConfig{Address: l.Addr().String()})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	cs.Write(frameMsg([]byte("hi")))
	cs.Flush()
	<-started
	s.Stop()
	_, err = cs.Read(make([]byte, 10))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("Read after server Stop = %v, want Unavailable", err)
	}
	if _, err := cc.NewStream(context.Background(), echoMethod, nil); status.Code(err) != codes.Unavailable {
		t.Errorf("NewStream after server Stop = %v, want Unavailable", err)
	}
}

func TestClientCancel(t *testing.T) {
	serverDone := make(chan error, 1)
	addr := startGRPCServer(t, func(_ any, ss grpc.ServerStream) error {
		var b []byte
		ss.RecvMsg(&b)
		<-ss.Context().Done()
		serverDone <- ss.Context().Err()
		return nil
	})
	cc := dial(t, DialConfig{Address: addr})
	ctx, cancel := context.WithCancel(context.Background())
	cs, err := cc.NewStream(ctx, echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	cs.Write(frameMsg([]byte("hi")))
	cs.Flush()
	cancel()
	if _, err := cs.Read(make([]byte, 10)); status.Code(err) != codes.Canceled {
		t.Errorf("Read after cancel = %v, want Canceled", err)
	}
	select {
	case err := <-serverDone:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("server stream ended with %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server never saw the cancellation")
	}
	// The connection stays usable.
	cs2, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	cs2.CloseSend()
}

func TestClientTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	addr := startGRPCServer(t, echoHandler, grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	cc := dial(t, DialConfig{Address: addr, TLS: &tls.Config{RootCAs: pool}})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	cs.Write(frameMsg([]byte("over tls")))
	cs.CloseSend()
	if got, err := readMsg(cs); err != nil || string(got) != "over tls" {
		t.Fatalf("readMsg = %q, %v", got, err)
	}
}

func TestClientTLSWithoutH2(t *testing.T) {
	cert, pool := selfSigned(t)
	for _, protos := range [][]string{{"http/1.1"}, nil} {
		t.Run(strings.Join(protos, ","), func(t *testing.T) {
			l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: protos})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			defer wg.Wait()
			defer l.Close()
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.(*tls.Conn).Handshake()
				io.Copy(io.Discard, c)
				c.Close()
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err = Dial(ctx, DialConfig{Address: l.Addr().String(), TLS: &tls.Config{RootCAs: pool}})
			if err == nil || !strings.Contains(err.Error(), "did not negotiate HTTP/2") || !strings.Contains(err.Error(), l.Addr().String()) {
				t.Fatalf("Dial = %v, want an error naming the address and the missing h2 ALPN", err)
			}
		})
	}
}

func TestDialContextEnds(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() { // accepts, never speaks HTTP/2
		defer wg.Done()
		c, err := l.Accept()
		if err == nil {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = Dial(ctx, DialConfig{Address: l.Addr().String()})
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), l.Addr().String()) {
		t.Fatalf("Dial = %v, want deadline exceeded naming the address", err)
	}
}

// freezer forwards TCP between a client and target until frozen, after
// which it forwards nothing (the peer looks hung, not gone).
type freezer struct {
	l      net.Listener
	mu     sync.Mutex
	frozen bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newFreezer(t *testing.T, target string) *freezer {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{l: l}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			f.mu.Lock()
			f.conns = append(f.conns, c, u)
			f.mu.Unlock()
			f.wg.Add(2)
			go f.pipe(c, u)
			go f.pipe(u, c)
		}
	}()
	t.Cleanup(f.close)
	return f
}

func (f *freezer) pipe(dst, src net.Conn) {
	defer f.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		f.mu.Lock()
		frozen := f.frozen
		f.mu.Unlock()
		if !frozen && n > 0 {
			dst.Write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

func (f *freezer) freeze() { f.mu.Lock(); f.frozen = true; f.mu.Unlock() }

func (f *freezer) close() {
	f.l.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

func TestClientKeepaliveDetectsHungServer(t *testing.T) {
	addr := startGRPCServer(t, func(_ any, ss grpc.ServerStream) error {
		<-ss.Context().Done()
		return nil
	}, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Millisecond, PermitWithoutStream: true}))
	fz := newFreezer(t, addr)
	const interval, timeout = 100 * time.Millisecond, 100 * time.Millisecond
	cc := dial(t, DialConfig{Address: fz.l.Addr().String(), KeepaliveInterval: interval, KeepaliveTimeout: timeout})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Pings answered: the stream survives several intervals.
	time.Sleep(5 * interval)
	select {
	case <-cc.done:
		t.Fatal("connection closed while the server answered pings")
	default:
	}
	fz.freeze()
	frozenAt := time.Now()
	_, err = cs.Read(make([]byte, 10))
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "keepalive") {
		t.Fatalf("Read = %v, want Unavailable naming keepalive", err)
	}
	// Generous bound (scheduling on a shared machine); the point is that
	// it is detected by keepalive, not by TCP timeouts minutes later.
	if d := time.Since(frozenAt); d > 10*(interval+timeout) {
		t.Errorf("hung server detected after %v, want about %v", d, interval+timeout)
	}
}

// TestClientReadBuffers reads the whole response body with ReadBuffers and
// checks it only at the end: a handed-over buffer that the stream reused
// would show as corrupted earlier bytes.
func TestClientReadBuffers(t *testing.T) {
	addr := startGRPCServer(t, echoHandler)
	cc := dial(t, DialConfig{Address: addr})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	msgs := [][]byte{[]byte("small"), payload(8 << 20), payload(3), payload(1 << 20)}
	var want []byte
	for _, m := range msgs {
		want = append(want, frameMsg(m)...)
	}
	wg := sendAll(t, cs, want)
	var bufs mem.BufferSlice
	for {
		n := len(bufs)
		bufs, err = cs.ReadBuffers(bufs, 7000)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := bufs[n:].Len(); got == 0 || got > 7000 {
			t.Fatalf("ReadBuffers(7000) returned %d bytes", got)
		}
	}
	wg.Wait()
	if got := bufs.Materialize(); !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes in %d buffers, want %d: content differs", len(got), len(bufs), len(want))
	}
	bufs.Free()
}

// TestClientReadBuffersFreed frees each buffer as soon as it is checked, so
// the connection's read buffers return to the pool and are read into again
// while the body still arrives: a slab recycled while a view of it was
// still out would show as a content mismatch.
func TestClientReadBuffersFreed(t *testing.T) {
	addr := startGRPCServer(t, echoHandler)
	cc := dial(t, DialConfig{Address: addr})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := frameMsg(payload(8 << 20))
	wg := sendAll(t, cs, want)
	off, heldOff := 0, 0
	var held mem.BufferSlice // the previous batch, checked again and freed one batch late
	check := func(bufs mem.BufferSlice, off int) int {
		for _, b := range bufs {
			d := b.ReadOnlyData()
			if !bytes.Equal(d, want[off:off+len(d)]) {
				t.Fatalf("bytes %d-%d differ", off, off+len(d))
			}
			off += len(d)
		}
		return off
	}
	for {
		bufs, err := cs.ReadBuffers(nil, 100000)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		check(held, heldOff)
		held.Free()
		held, heldOff = bufs, off
		off = check(bufs, off)
	}
	held.Free()
	wg.Wait()
	if off != len(want) {
		t.Fatalf("read %d bytes, want %d", off, len(want))
	}
}

// sendAll writes b on cs and half-closes it, in the background; wait on
// the result before the test ends.
func sendAll(t *testing.T, cs *ClientStream, b []byte) *sync.WaitGroup {
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := cs.Write(b); err != nil {
			t.Errorf("Write: %v", err)
		}
		if err := cs.CloseSend(); err != nil {
			t.Errorf("CloseSend: %v", err)
		}
	})
	return &wg
}

// TestClientReadAhead: after ReadAhead(n) the server sends a whole n-byte
// message although the client reads nothing and its window is far smaller,
// and once the message is consumed the stream is back to its usual window
// (the extra credit is not renewed).
func TestClientReadAhead(t *testing.T) {
	const window, size = 256 << 10, 8 << 20
	addr := startGRPCServer(t, echoHandler)
	cc := dial(t, DialConfig{Address: addr, Window: window})
	cs, err := cc.NewStream(context.Background(), echoMethod, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The request stays open, so the stream does too once the answer is
	// read. Write leaves the message's tail buffered: only Flush puts it on
	// the wire (without it the test hung whenever no PING ack happened to
	// flush the tail).
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := cs.Write(frameMsg(payload(size))); err != nil {
			t.Errorf("Write: %v", err)
		}
		if err := cs.Flush(); err != nil {
			t.Errorf("Flush: %v", err)
		}
	})
	var hdr [5]byte
	if _, err := io.ReadFull(cs, hdr[:]); err != nil {
		t.Fatal(err)
	}
	cs.ReadAhead(int(binary.BigEndian.Uint32(hdr[1:])))
	queued := func() int {
		cs.st.mu.Lock()
		defer cs.st.mu.Unlock()
		return cs.st.q.n
	}
	for deadline := time.Now().Add(20 * time.Second); queued() < size; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of the %d-byte message arrived without reads, want all of it (window %d)", queued(), size, window)
		}
	}
	got := make([]byte, size)
	if _, err := io.ReadFull(cs, got); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if !bytes.Equal(got, payload(size)) {
		t.Fatal("message content differs")
	}
	cs.st.mu.Lock()
	avail, done := cs.st.recvAvail, cs.st.recvDone
	cs.st.mu.Unlock()
	if done {
		t.Fatal("the stream ended; the test needs it open")
	}
	if avail > window {
		t.Fatalf("after the message the server may send %d bytes, want at most the window (%d)", avail, window)
	}
	if err := cs.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after CloseSend: %v, want EOF", err)
	}
}
