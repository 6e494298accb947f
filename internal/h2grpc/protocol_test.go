package h2grpc

import (
	"io"
	"sync/atomic"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// waitCancel holds the stream open until the client or Stop ends it.
func waitCancel(st *ServerStream) error {
	<-st.Context().Done()
	return nil
}

// earlyError answers at once, without reading the request.
func earlyError(*ServerStream) error {
	return status.Error(codes.PermissionDenied, "no")
}

// TestServerStreamStates covers RFC 9113 §5.1 for frames on streams that
// are half-closed or closed: an error when the client ended the stream
// itself, silence when the server's RST_STREAM may have crossed them.
func TestServerStreamStates(t *testing.T) {
	msg := frameMsg([]byte("x"))
	tests := []struct {
		name   string
		handle func(*ServerStream) error
		run    func(rc *rawClient)
		// repeat runs the case on this many connections: the server ends a
		// stream on one goroutine while it reads the client's next frame on
		// another, and a race between the two shows only now and then.
		repeat int
	}{
		{name: "HEADERS on a half-closed (remote) stream", handle: waitCancel, run: func(rc *rawClient) {
			rc.headers(1, true, grpcRequest(echoMethod)...)
			rc.headers(1, true, hf("x-trailer", "1"))
			if code := rc.rst(1); code != http2.ErrCodeStreamClosed {
				t.Errorf("RST_STREAM %v, want STREAM_CLOSED", code)
			}
			rc.sync(false)
		}},
		{name: "DATA after the client's RST_STREAM", handle: waitCancel, run: func(rc *rawClient) {
			rc.headers(1, false, grpcRequest(echoMethod)...)
			rc.check(rc.fr.WriteRSTStream(1, http2.ErrCodeCancel))
			rc.streams[1].reset = true
			rc.check(rc.fr.WriteData(1, false, msg))
			if code := rc.rst(1); code != http2.ErrCodeStreamClosed {
				t.Errorf("RST_STREAM %v, want STREAM_CLOSED", code)
			}
			rc.sync(false)
		}},
		{name: "DATA after both ends closed the stream", handle: echo, run: func(rc *rawClient) {
			rc.headers(1, true, grpcRequest(echoMethod)...)
			rc.trailers(1)
			rc.check(rc.fr.WriteData(1, true, msg))
			if code := rc.rst(1); code != http2.ErrCodeStreamClosed {
				t.Errorf("RST_STREAM %v, want STREAM_CLOSED", code)
			}
			rc.sync(false)
		}},
		{name: "DATA and trailers crossing the server's RST_STREAM are ignored", handle: earlyError, run: func(rc *rawClient) {
			rc.headers(1, false, grpcRequest(echoMethod)...)
			rc.trailers(1)
			if code := rc.rst(1); code != http2.ErrCodeNo {
				t.Errorf("RST_STREAM %v after the early answer, want NO_ERROR", code)
			}
			rc.check(rc.fr.WriteData(1, false, msg))
			rc.headers(1, true, hf("x-trailer", "1"))
			rc.sync(false)
			// The connection still serves.
			rc.headers(3, true, grpcRequest(echoMethod)...)
			rc.trailers(3)
		}},
		{name: "frames after a header block the Framer rejects", handle: echo, run: func(rc *rawClient) {
			rc.headers(1, false, append(grpcRequest(echoMethod), hf("X-Upper", "1"))...)
			if code := rc.rst(1); code != http2.ErrCodeProtocol {
				t.Errorf("RST_STREAM %v, want PROTOCOL_ERROR", code)
			}
			rc.streams[1].reset = true
			// The stream is closed now, not idle: no connection error.
			rc.check(rc.fr.WriteData(1, true, msg))
			rc.sync(false)
		}},
		{name: "HEADERS on a closed stream the server did not reset", handle: echo, run: func(rc *rawClient) {
			rc.headers(1, true, grpcRequest(echoMethod)...)
			rc.trailers(1)
			rc.headers(1, true, grpcRequest(echoMethod)...)
			if code, err := rc.goAway(); err != nil || code != http2.ErrCodeStreamClosed {
				t.Errorf("GOAWAY %v (%v), want STREAM_CLOSED", code, err)
			}
		}, repeat: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, path := startServer(t, ServerConfig{Handle: tt.handle})
			for i := 0; i < max(tt.repeat, 1) && !t.Failed(); i++ {
				tt.run(dialRaw(t, path, 0))
			}
		})
	}
}

// TestServerPriority: PRIORITY signals are ignored, except a stream that
// depends on itself (RFC 9113 §5.3.1).
func TestServerPriority(t *testing.T) {
	self := http2.PriorityParam{StreamDep: 1, Weight: 15}
	tests := []struct {
		name string
		run  func(t *testing.T, rc *rawClient)
	}{
		{name: "HEADERS that depend on themselves", run: func(t *testing.T, rc *rawClient) {
			rc.stream(1)
			rc.check(rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.block(grpcRequest(echoMethod)...),
				EndStream: true, EndHeaders: true, Priority: self}))
			if code := rc.rst(1); code != http2.ErrCodeProtocol {
				t.Errorf("RST_STREAM %v, want PROTOCOL_ERROR", code)
			}
			rc.sync(false)
		}},
		{name: "PRIORITY on an open stream that depends on itself", run: func(t *testing.T, rc *rawClient) {
			rc.headers(1, false, grpcRequest(echoMethod)...)
			rc.check(rc.fr.WritePriority(1, self))
			if code := rc.rst(1); code != http2.ErrCodeProtocol {
				t.Errorf("RST_STREAM %v, want PROTOCOL_ERROR", code)
			}
			rc.sync(false)
		}},
		{name: "PRIORITY on an idle stream that depends on itself", run: func(t *testing.T, rc *rawClient) {
			rc.check(rc.fr.WritePriority(1, self))
			if code, err := rc.goAway(); err != nil || code != http2.ErrCodeProtocol {
				t.Errorf("GOAWAY %v (%v), want PROTOCOL_ERROR", code, err)
			}
		}},
		{name: "valid PRIORITY everywhere is ignored", run: func(t *testing.T, rc *rawClient) {
			rc.check(rc.fr.WritePriority(5, http2.PriorityParam{StreamDep: 0, Weight: 200})) // idle stream
			rc.stream(1)
			rc.check(rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.block(grpcRequest(echoMethod)...),
				EndHeaders: true, Priority: http2.PriorityParam{StreamDep: 0, Exclusive: true, Weight: 255}, PadLength: 7}))
			rc.check(rc.fr.WritePriority(1, http2.PriorityParam{StreamDep: 3, Weight: 1}))
			rc.check(rc.fr.WriteData(1, true, frameMsg([]byte("p"))))
			if got := rc.trailers(1); len(got.fields) == 0 || rc.streams[1].body.Len() != 6 {
				t.Errorf("echo through PRIORITY frames: %d body bytes", rc.streams[1].body.Len())
			}
			rc.check(rc.fr.WritePriority(1, http2.PriorityParam{StreamDep: 0, Weight: 1})) // closed stream
			rc.sync(false)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, path := startServer(t, ServerConfig{Handle: echo})
			tt.run(t, dialRaw(t, path, 0))
		})
	}
}

// TestServerMalformedRequests: RFC 9113 §8.1.1, §8.2.2, §8.3.1 requests
// are reset with PROTOCOL_ERROR and never reach the handler; the
// connection goes on.
func TestServerMalformedRequests(t *testing.T) {
	without := func(name string) []hpack.HeaderField {
		var out []hpack.HeaderField
		for _, f := range grpcRequest(echoMethod) {
			if f.Name != name {
				out = append(out, f)
			}
		}
		return out
	}
	tests := []struct {
		name   string
		fields []hpack.HeaderField
		body   [][]byte // DATA frames; the last ends the stream
	}{
		{name: "connection", fields: grpcRequest(echoMethod, hf("connection", "keep-alive"))},
		{name: "keep-alive", fields: grpcRequest(echoMethod, hf("keep-alive", "1"))},
		{name: "proxy-connection", fields: grpcRequest(echoMethod, hf("proxy-connection", "x"))},
		{name: "transfer-encoding", fields: grpcRequest(echoMethod, hf("transfer-encoding", "chunked"))},
		{name: "upgrade", fields: grpcRequest(echoMethod, hf("upgrade", "h2c"))},
		{name: "te other than trailers", fields: append(without("te"), hf("te", "gzip"))},
		{name: "no :method", fields: without(":method")},
		{name: "no :scheme", fields: without(":scheme")},
		{name: "no :path", fields: without(":path")},
		{name: "empty :path", fields: append(without(":path")[:0:0], hf(":method", "POST"), hf(":scheme", "http"), hf(":path", ""), hf("content-type", "application/grpc"))},
		{name: ":status in a request", fields: append([]hpack.HeaderField{hf(":status", "200")}, without(":method")...)},
		{name: ":protocol without extended CONNECT", fields: append([]hpack.HeaderField{hf(":protocol", "websocket")}, grpcRequest(echoMethod)...)},
		{name: "content-length above the body", fields: grpcRequest(echoMethod, hf("content-length", "10")), body: [][]byte{make([]byte, 6)}},
		{name: "content-length below the body", fields: grpcRequest(echoMethod, hf("content-length", "4")), body: [][]byte{make([]byte, 3), make([]byte, 3)}},
		{name: "content-length without a body", fields: grpcRequest(echoMethod, hf("content-length", "4"))},
		{name: "content-length not a number", fields: grpcRequest(echoMethod, hf("content-length", "4x")), body: [][]byte{make([]byte, 4)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var called atomic.Int32
			_, path := startServer(t, ServerConfig{Handle: func(st *ServerStream) error {
				called.Add(1)
				return echo(st)
			}})
			rc := dialRaw(t, path, 0)
			rc.headers(1, len(tt.body) == 0, tt.fields...)
			for i, b := range tt.body {
				rc.check(rc.fr.WriteData(1, i == len(tt.body)-1, b))
			}
			if code := rc.rst(1); code != http2.ErrCodeProtocol {
				t.Errorf("RST_STREAM %v, want PROTOCOL_ERROR", code)
			}
			rc.streams[1].reset = true
			rc.sync(true)
			if n := called.Load(); n != 0 && len(tt.body) == 0 {
				t.Errorf("handler called %d times for a malformed request", n)
			}
			// The connection still serves.
			rc.headers(3, false, grpcRequest(echoMethod, hf("content-length", "6"))...)
			rc.check(rc.fr.WriteData(3, true, frameMsg([]byte("y"))))
			if b := rc.trailers(3); rc.streams[3].body.Len() != 6 {
				t.Errorf("well-formed request with content-length: %d body bytes, trailers %v", rc.streams[3].body.Len(), b.fields)
			}
		})
	}
}

// TestServerMalformedTrailers: request trailers must end the stream and
// carry no pseudo-header.
func TestServerMalformedTrailers(t *testing.T) {
	tests := []struct {
		name   string
		end    bool
		fields []hpack.HeaderField
	}{
		{name: "without END_STREAM", fields: []hpack.HeaderField{hf("x-t", "1")}},
		{name: "with a pseudo-header", end: true, fields: []hpack.HeaderField{hf(":path", "/x")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, path := startServer(t, ServerConfig{Handle: waitCancel})
			rc := dialRaw(t, path, 0)
			rc.headers(1, false, grpcRequest(echoMethod)...)
			rc.headers(1, tt.end, tt.fields...)
			if code := rc.rst(1); code != http2.ErrCodeProtocol {
				t.Errorf("RST_STREAM %v, want PROTOCOL_ERROR", code)
			}
			rc.sync(false)
		})
	}
}

// TestServerRefusesStreamsBeyondLimit: a client that ignores
// SETTINGS_MAX_CONCURRENT_STREAMS gets REFUSED_STREAM (safe to retry).
func TestServerRefusesStreamsBeyondLimit(t *testing.T) {
	_, path := startServer(t, ServerConfig{Handle: waitCancel, MaxConcurrentStreams: 1})
	rc := dialRaw(t, path, 0)
	rc.headers(1, false, grpcRequest(echoMethod)...)
	rc.headers(3, false, grpcRequest(echoMethod)...)
	if code := rc.rst(3); code != http2.ErrCodeRefusedStream {
		t.Errorf("RST_STREAM %v, want REFUSED_STREAM", code)
	}
	rc.streams[3].reset = true
	rc.check(rc.fr.WriteData(3, true, frameMsg(nil))) // crossed the RST_STREAM: ignored
	rc.sync(false)
	if _, ok := rc.streams[1]; !ok || rc.streams[1].ended {
		t.Error("the first stream ended")
	}
}

// TestServerAnswersNonGRPC: requests that are well-formed HTTP/2 but not
// gRPC get a trailers-only gRPC error (what grpc-go clients and Envoy
// understand) and the connection goes on.
func TestServerAnswersNonGRPC(t *testing.T) {
	var called atomic.Int32
	_, path := startServer(t, ServerConfig{Handle: func(st *ServerStream) error {
		called.Add(1)
		io.Copy(io.Discard, st)
		return nil
	}})
	rc := dialRaw(t, path, 0)
	tests := []struct {
		name   string
		end    bool
		fields []hpack.HeaderField
		code   codes.Code
	}{
		{name: "GET", end: true, fields: []hpack.HeaderField{hf(":method", "GET"), hf(":scheme", "http"), hf(":path", "/"), hf(":authority", "x")}},
		{name: "POST text/plain still sending", fields: []hpack.HeaderField{hf(":method", "POST"), hf(":scheme", "http"), hf(":path", "/"), hf("content-type", "text/plain")}},
		{name: "POST without content-type", end: true, fields: []hpack.HeaderField{hf(":method", "POST"), hf(":scheme", "http"), hf(":path", "/")}},
	}
	id := uint32(1)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc.headers(id, tt.end, tt.fields...)
			b := rc.trailers(id)
			if s, _ := b.get(":status"); s != "200" || len(rc.streams[id].blocks) != 1 {
				t.Errorf("answer: %v in %d blocks, want a trailers-only response", b.fields, len(rc.streams[id].blocks))
			}
			if c, _ := b.get("grpc-status"); c != "13" {
				t.Errorf("grpc-status %q, want 13 (Internal)", c)
			}
			if !tt.end {
				if code := rc.rst(id); code != http2.ErrCodeNo {
					t.Errorf("RST_STREAM %v, want NO_ERROR to stop the request body", code)
				}
			}
			rc.sync(false)
			id += 2
		})
	}
	if n := called.Load(); n != 0 {
		t.Errorf("handler called %d times for non-gRPC requests", n)
	}
}

// TestServerHeaderTableSize: the server's HPACK encoder follows the
// client's SETTINGS_HEADER_TABLE_SIZE: after it shrank (even if it grew
// again before the next header block) the next block starts with a dynamic
// table size update to the lowest value (RFC 7541 §4.2), which nghttp2
// requires.
func TestServerHeaderTableSize(t *testing.T) {
	tests := []struct {
		name     string
		sizes    []uint32 // SETTINGS_HEADER_TABLE_SIZE values sent in turn
		firstMax uint32   // the first update in the next block must be at most this
	}{
		{name: "shrunk to 0", sizes: []uint32{0}, firstMax: 0},
		{name: "shrunk to 0 and restored", sizes: []uint32{0, 4096}, firstMax: 0},
		{name: "shrunk to 100 then 50 then grown", sizes: []uint32{100, 50, 65536}, firstMax: 50},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, path := startServer(t, ServerConfig{Handle: echo})
			rc := dialRaw(t, path, 0)
			// A first response fills the server's dynamic table.
			rc.headers(1, true, grpcRequest(echoMethod)...)
			rc.trailers(1)
			for _, v := range tt.sizes {
				rc.settings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: v})
			}
			rc.sync(false) // every SETTINGS acknowledged
			rc.headers(3, true, grpcRequest(echoMethod)...)
			b := rc.trailers(3)
			size, ok := firstTableSizeUpdate(b.raw)
			if !ok || size > tt.firstMax {
				t.Fatalf("header block after the SETTINGS starts with % x: want a dynamic table size update to at most %d", b.raw[:min(len(b.raw), 4)], tt.firstMax)
			}
			// And the connection keeps working with the new table.
			rc.headers(5, true, grpcRequest(echoMethod)...)
			rc.trailers(5)
		})
	}
}

// firstTableSizeUpdate decodes a dynamic table size update (RFC 7541
// §6.3) at the start of an HPACK block.
func firstTableSizeUpdate(b []byte) (uint32, bool) {
	if len(b) == 0 || b[0]&0xe0 != 0x20 {
		return 0, false
	}
	v := uint32(b[0] & 0x1f)
	if v < 0x1f {
		return v, true
	}
	var shift uint
	for _, c := range b[1:] {
		v += uint32(c&0x7f) << shift
		shift += 7
		if c&0x80 == 0 {
			return v, true
		}
	}
	return 0, false
}
