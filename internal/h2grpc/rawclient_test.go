package h2grpc

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient drives a Server with hand-written frames, as a client with its
// own HTTP/2 codec (Envoy's nghttp2 or oghttp2) would, and checks every
// frame the server sends against what such a client enforces: frame sizes
// and flow-control windows, header blocks that are well-formed gRPC
// responses, nothing on a stream after END_STREAM.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	fr *http2.Framer

	enc  *hpack.Encoder
	ebuf bytes.Buffer
	dec  *hpack.Decoder

	// Our settings as the server has acknowledged them, and changes sent
	// but not yet acknowledged (oldest first).
	iws         int64
	maxFrame    uint32
	unacked     []map[http2.SettingID]uint32
	connLimit   int64 // connection window the server may fill: 65535 + increments
	connSent    int64
	streams     map[uint32]*rawStream
	serverPings [][8]byte
}

type rawStream struct {
	wu, sent        int64
	headers, ended  bool
	trailers        bool
	reset           bool
	body            bytes.Buffer
	blocks          []rawBlock
	maxDataFrameLen int
}

// rawBlock is one decoded header block from the server.
type rawBlock struct {
	stream uint32
	end    bool
	raw    []byte // HPACK bytes of the whole block
	fields []hpack.HeaderField
}

func (b rawBlock) get(name string) (string, bool) {
	for _, f := range b.fields {
		if f.Name == name {
			return f.Value, true
		}
	}
	return "", false
}

// dialRaw connects to the Server's unix socket, sends the preface and
// settings (and a connection WINDOW_UPDATE of connWU when above 0), and
// waits for the server's SETTINGS.
func dialRaw(t testing.TB, path string, connWU uint32, settings ...http2.Setting) *rawClient {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	rc := &rawClient{t: t, nc: nc, fr: http2.NewFramer(nc, nc), iws: 65535, maxFrame: 16384,
		connLimit: 65535, streams: make(map[uint32]*rawStream), dec: hpack.NewDecoder(4096, nil)}
	rc.enc = hpack.NewEncoder(&rc.ebuf)
	if _, err := nc.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	rc.settings(settings...)
	if connWU > 0 {
		rc.check(rc.fr.WriteWindowUpdate(0, connWU))
		rc.connLimit += int64(connWU)
	}
	for {
		f := rc.next()
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			return rc
		}
	}
}

func (rc *rawClient) check(err error) {
	rc.t.Helper()
	if err != nil {
		rc.t.Fatal(err)
	}
}

// settings sends SETTINGS; they count once the server acknowledges them.
func (rc *rawClient) settings(ss ...http2.Setting) {
	rc.t.Helper()
	m := make(map[http2.SettingID]uint32)
	for _, s := range ss {
		m[s.ID] = s.Val
	}
	rc.unacked = append(rc.unacked, m)
	rc.check(rc.fr.WriteSettings(ss...))
}

// block HPACK-encodes fields with the client's encoder.
func (rc *rawClient) block(fields ...hpack.HeaderField) []byte {
	rc.ebuf.Reset()
	for _, f := range fields {
		rc.check(rc.enc.WriteField(f))
	}
	return append([]byte(nil), rc.ebuf.Bytes()...)
}

func (rc *rawClient) stream(id uint32) *rawStream {
	st := rc.streams[id]
	if st == nil {
		st = &rawStream{}
		rc.streams[id] = st
	}
	return st
}

// headers opens (or continues) stream id with one HEADERS frame.
func (rc *rawClient) headers(id uint32, end bool, fields ...hpack.HeaderField) {
	rc.t.Helper()
	rc.stream(id)
	rc.check(rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.block(fields...), EndStream: end, EndHeaders: true}))
}

// next reads one frame (5 s at most), checks it, and returns it. Header
// blocks come back as rawBlock (HEADERS and CONTINUATION merged).
func (rc *rawClient) next() any {
	rc.t.Helper()
	f, err := rc.read()
	if err != nil {
		rc.t.Fatalf("reading from the server: %v", err)
	}
	return f
}

func (rc *rawClient) read() (any, error) {
	rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := rc.fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			if len(rc.unacked) == 0 {
				return nil, errors.New("SETTINGS ACK for nothing")
			}
			for id, v := range rc.unacked[0] {
				switch id {
				case http2.SettingInitialWindowSize:
					rc.iws = int64(v)
				case http2.SettingMaxFrameSize:
					rc.maxFrame = v
				case http2.SettingHeaderTableSize:
					rc.dec.SetAllowedMaxDynamicTableSize(v)
				}
			}
			rc.unacked = rc.unacked[1:]
		}
		return f, nil
	case *http2.DataFrame:
		st := rc.streams[f.StreamID]
		n := int64(f.Length)
		switch {
		case st == nil:
			return nil, fmt.Errorf("DATA on stream %d we never opened", f.StreamID)
		case st.reset:
			return f, nil // sent before the server saw our RST_STREAM
		case !st.headers || st.ended:
			return nil, fmt.Errorf("DATA on stream %d before response headers or after END_STREAM", f.StreamID)
		case f.Length > rc.frameLimit():
			return nil, fmt.Errorf("DATA of %d bytes, above SETTINGS_MAX_FRAME_SIZE %d", f.Length, rc.frameLimit())
		}
		st.sent += n
		rc.connSent += n
		if st.sent > rc.iwsLimit()+st.wu {
			return nil, fmt.Errorf("stream %d: %d bytes sent, window allows %d", f.StreamID, st.sent, rc.iwsLimit()+st.wu)
		}
		if rc.connSent > rc.connLimit {
			return nil, fmt.Errorf("connection: %d bytes sent, window allows %d", rc.connSent, rc.connLimit)
		}
		st.body.Write(f.Data())
		st.maxDataFrameLen = max(st.maxDataFrameLen, int(f.Length))
		if f.StreamEnded() {
			return nil, fmt.Errorf("stream %d: DATA with END_STREAM: gRPC responses end with trailers", f.StreamID)
		}
		return f, nil
	case *http2.HeadersFrame:
		b := rawBlock{stream: f.StreamID, end: f.StreamEnded(), raw: append([]byte(nil), f.HeaderBlockFragment()...)}
		for !f.HeadersEnded() {
			nf, err := rc.fr.ReadFrame()
			if err != nil {
				return nil, err
			}
			cf, ok := nf.(*http2.ContinuationFrame)
			if !ok || cf.StreamID != b.stream {
				return nil, fmt.Errorf("%v in the middle of a header block", nf)
			}
			b.raw = append(b.raw, cf.HeaderBlockFragment()...)
			if cf.HeadersEnded() {
				break
			}
		}
		fields, err := rc.dec.DecodeFull(b.raw)
		if err != nil {
			return nil, fmt.Errorf("HPACK: %w", err)
		}
		b.fields = fields
		return b, rc.checkBlock(b)
	case *http2.RSTStreamFrame:
		if st := rc.streams[f.StreamID]; st != nil {
			st.ended = true
		} else {
			return nil, fmt.Errorf("RST_STREAM on idle stream %d", f.StreamID)
		}
		return f, nil
	case *http2.PingFrame:
		if !f.IsAck() {
			rc.serverPings = append(rc.serverPings, f.Data)
		}
		return f, nil
	case *http2.WindowUpdateFrame, *http2.GoAwayFrame:
		return f, nil
	default:
		return nil, fmt.Errorf("unexpected frame from the server: %v", f)
	}
}

// iwsLimit is the most INITIAL_WINDOW_SIZE the server may be using: while a
// change is unacknowledged, the larger of the old and new value.
func (rc *rawClient) iwsLimit() int64 {
	v := rc.iws
	for _, m := range rc.unacked {
		if n, ok := m[http2.SettingInitialWindowSize]; ok {
			v = max(v, int64(n))
		}
	}
	return v
}

func (rc *rawClient) frameLimit() uint32 {
	v := rc.maxFrame
	for _, m := range rc.unacked {
		if n, ok := m[http2.SettingMaxFrameSize]; ok {
			v = max(v, n)
		}
	}
	return v
}

// connectionSpecific are the fields RFC 9113 §8.2.2 forbids in HTTP/2 and
// Envoy's codec rejects in a response.
var connectionSpecific = []string{"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}

// checkBlock checks a response header block as Envoy would: response
// headers with :status 200 first and a gRPC content-type; trailers with
// END_STREAM, grpc-status and no pseudo-header; never 1xx, content-length,
// connection-specific or upper-case fields.
func (rc *rawClient) checkBlock(b rawBlock) error {
	st := rc.streams[b.stream]
	if st == nil {
		return fmt.Errorf("HEADERS on stream %d we never opened", b.stream)
	}
	if st.reset {
		return nil
	}
	if st.ended {
		return fmt.Errorf("stream %d: HEADERS after END_STREAM", b.stream)
	}
	st.blocks = append(st.blocks, b)
	for i, f := range b.fields {
		if f.Name != strings.ToLower(f.Name) {
			return fmt.Errorf("stream %d: upper-case field name %q", b.stream, f.Name)
		}
		for _, c := range connectionSpecific {
			if f.Name == c {
				return fmt.Errorf("stream %d: connection-specific field %q", b.stream, f.Name)
			}
		}
		if f.Name == "content-length" {
			return fmt.Errorf("stream %d: content-length on a gRPC response", b.stream)
		}
		if strings.HasPrefix(f.Name, ":") && (st.headers || f.Name != ":status" || i != 0) {
			return fmt.Errorf("stream %d: pseudo-header %q at %d (trailers: %v)", b.stream, f.Name, i, st.headers)
		}
	}
	if !st.headers {
		s, _ := b.get(":status")
		if s != "200" {
			return fmt.Errorf("stream %d: :status %q, want 200", b.stream, s)
		}
		if ct, _ := b.get("content-type"); !isGRPCContentType(ct) {
			return fmt.Errorf("stream %d: content-type %q", b.stream, ct)
		}
		st.headers = true
		if !b.end {
			return nil
		}
	} else if !b.end {
		return fmt.Errorf("stream %d: trailers without END_STREAM", b.stream)
	}
	if _, ok := b.get("grpc-status"); !ok {
		return fmt.Errorf("stream %d: trailers without grpc-status", b.stream)
	}
	st.trailers, st.ended = true, true
	return nil
}

// until reads frames until one satisfies match, which it returns.
func (rc *rawClient) until(what string, match func(f any) bool) any {
	rc.t.Helper()
	for {
		f, err := rc.read()
		if err != nil {
			rc.t.Fatalf("waiting for %s: %v", what, err)
		}
		if match(f) {
			return f
		}
		if g, ok := f.(*http2.GoAwayFrame); ok && what != "GOAWAY" {
			rc.t.Fatalf("waiting for %s: server sent GOAWAY %v %q", what, g.ErrCode, g.DebugData())
		}
	}
}

// rst waits for RST_STREAM on id and returns its code.
func (rc *rawClient) rst(id uint32) http2.ErrCode {
	rc.t.Helper()
	f := rc.until(fmt.Sprintf("RST_STREAM on stream %d", id), func(f any) bool {
		r, ok := f.(*http2.RSTStreamFrame)
		return ok && r.StreamID == id
	})
	return f.(*http2.RSTStreamFrame).ErrCode
}

// trailers waits for the end of stream id's response and returns the
// final header block.
func (rc *rawClient) trailers(id uint32) rawBlock {
	rc.t.Helper()
	f := rc.until(fmt.Sprintf("trailers on stream %d", id), func(f any) bool {
		b, ok := f.(rawBlock)
		return ok && b.stream == id && b.end
	})
	return f.(rawBlock)
}

// sync sends a PING and reads until its ACK: the server has processed
// everything sent before, and the frames it answered with were read. It
// fails on RST_STREAM or GOAWAY unless allowed.
func (rc *rawClient) sync(allowRST bool) {
	rc.t.Helper()
	data := [8]byte{'s', 'y', 'n', 'c', byte(time.Now().UnixNano())}
	rc.check(rc.fr.WritePing(false, data))
	rc.until("PING ACK", func(f any) bool {
		if r, ok := f.(*http2.RSTStreamFrame); ok && !allowRST {
			rc.t.Fatalf("unexpected RST_STREAM(%v) on stream %d", r.ErrCode, r.StreamID)
		}
		p, ok := f.(*http2.PingFrame)
		return ok && p.IsAck() && p.Data == data
	})
}

// body reads until stream id's response body holds n bytes.
func (rc *rawClient) body(id uint32, n int) []byte {
	rc.t.Helper()
	st := rc.streams[id]
	rc.until(fmt.Sprintf("%d body bytes on stream %d", n, id), func(any) bool { return st.body.Len() >= n })
	return st.body.Bytes()
}

// goAway reads until GOAWAY (or the connection's end) and returns its code.
func (rc *rawClient) goAway() (http2.ErrCode, error) {
	for {
		f, err := rc.read()
		if err != nil {
			return 0, err
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			return g.ErrCode, nil
		}
	}
}

// returnCredit sends WINDOW_UPDATE for n bytes of stream id and of the
// connection.
func (rc *rawClient) returnCredit(id uint32, n int) {
	rc.t.Helper()
	rc.check(rc.fr.WriteWindowUpdate(id, uint32(n)))
	rc.check(rc.fr.WriteWindowUpdate(0, uint32(n)))
	rc.streams[id].wu += int64(n)
	rc.connLimit += int64(n)
}

func hf(name, value string) hpack.HeaderField { return hpack.HeaderField{Name: name, Value: value} }

// grpcRequest is the header list of a gRPC request for path.
func grpcRequest(path string, extra ...hpack.HeaderField) []hpack.HeaderField {
	return append([]hpack.HeaderField{
		hf(":method", "POST"), hf(":scheme", "http"), hf(":path", path), hf(":authority", "xds-grpc"),
		hf("content-type", "application/grpc"), hf("te", "trailers"),
	}, extra...)
}
