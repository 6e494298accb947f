package h2grpc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// prefaceTimeout bounds how long an accepted connection may take to send the
// client preface and SETTINGS.
const prefaceTimeout = 20 * time.Second

// ServerConfig configures a Server.
type ServerConfig struct {
	// Handle serves one stream in its own goroutine. When it returns, the
	// stream ends: response headers (if not sent yet) then trailers with
	// grpc-status/grpc-message from the error (nil = OK; a grpc status
	// error gives code, message and details; any other error is
	// codes.Unknown with err.Error()).
	Handle func(st *ServerStream) error
	// KeepaliveInterval: when nothing has been received for this long, send
	// a PING; no ACK (or any other frame) within KeepaliveTimeout closes the
	// connection. Zero = no pings.
	KeepaliveInterval, KeepaliveTimeout time.Duration
	// MaxConcurrentStreams is advertised and enforced (REFUSED_STREAM beyond
	// it). 0 = 1000.
	MaxConcurrentStreams uint32
	// Log receives connection-level events. nil = no logging.
	Log *zap.Logger
}

// Server serves gRPC streams over HTTP/2 (prior knowledge, no TLS) on
// listeners, typically the agent's unix socket.
type Server struct {
	cfg    ServerConfig
	log    *zap.Logger
	pool   *sync.Pool
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	stopped   bool
	wg        sync.WaitGroup // connection goroutines and handlers

	// serveAll (tests only) hands every well-formed request to Handle,
	// gRPC or not, so a conformance suite's plain GET and POST requests
	// can get responses with a body.
	serveAll bool
}

// NewServer returns a Server; cfg.Handle must be set.
func NewServer(cfg ServerConfig) *Server {
	if cfg.MaxConcurrentStreams == 0 {
		cfg.MaxConcurrentStreams = 1000
	}
	if cfg.KeepaliveInterval > 0 && cfg.KeepaliveTimeout <= 0 {
		cfg.KeepaliveTimeout = 20 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		cfg:       cfg,
		log:       log.Named("h2grpc"),
		pool:      newChunkPool(),
		ctx:       ctx,
		cancel:    cancel,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*serverConn]struct{}),
	}
}

// Serve accepts connections on l until Stop; it returns nil after Stop, else
// the accept error.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			stopped := s.stopped
			s.mu.Unlock()
			if stopped {
				return nil
			}
			return fmt.Errorf("h2grpc: accept on %s: %w", l.Addr(), err)
		}
		s.mu.Lock()
		if s.stopped {
			s.mu.Unlock()
			nc.Close()
			return nil
		}
		sc := s.newServerConn(nc)
		s.conns[sc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go sc.serve()
	}
}

// Stop closes the listeners and every connection (GOAWAY, then close),
// cancels every stream's context, and waits for the handlers and connection
// goroutines to return.
func (s *Server) Stop() {
	s.mu.Lock()
	s.stopped = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*serverConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	// Connections close before contexts are cancelled: a handler that
	// returns on cancellation must find its stream already gone, or the
	// client would read its OK trailers as a clean end instead of
	// Unavailable.
	var wg sync.WaitGroup
	for _, sc := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sc.goAway(http2.ErrCodeNo, sc.lastPeerID(), "server stopping")
			sc.close(errors.New("server stopped"))
		}()
	}
	wg.Wait()
	s.cancel()
	s.wg.Wait()
}

// serverConn is one accepted connection.
type serverConn struct {
	*conn
	srv       *Server
	maxPeerID uint32 // highest stream ID the client opened; under c.mu
}

func (s *Server) newServerConn(nc net.Conn) *serverConn {
	sc := &serverConn{srv: s}
	sc.conn = newConn(nc, s.log.With(zap.String("peer", nc.RemoteAddr().String())), s.pool, slabs,
		defaultWindow, s.cfg.KeepaliveInterval, s.cfg.KeepaliveTimeout)
	sc.conn.role = sc
	return sc
}

func (sc *serverConn) lastPeerID() uint32 {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.maxPeerID
}

func (sc *serverConn) serve() {
	defer sc.srv.wg.Done()
	defer func() {
		sc.srv.mu.Lock()
		delete(sc.srv.conns, sc)
		sc.srv.mu.Unlock()
	}()
	err := sc.handshake()
	if err == nil {
		sc.startKeepalive()
		err = sc.readLoop()
	}
	var ce connError
	if errors.As(err, &ce) {
		sc.log.Debug("closing connection on protocol error", zap.Error(err))
		sc.goAway(ce.code, sc.lastPeerID(), ce.reason)
	}
	sc.close(err)
}

// handshake sends our SETTINGS and reads the client preface; the readLoop
// then requires SETTINGS as the first frame.
func (sc *serverConn) handshake() error {
	err := sc.writeSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.srv.cfg.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(sc.recvWindow)},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
	)
	if err != nil {
		return err
	}
	sc.nc.SetReadDeadline(time.Now().Add(prefaceTimeout))
	buf := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(sc.br, buf); err != nil {
		return fmt.Errorf("read client preface: %w", err)
	}
	if !bytes.Equal(buf, []byte(http2.ClientPreface)) {
		return protoErr("bad client preface")
	}
	f, err := sc.rfr.ReadFrame()
	if err != nil {
		return sc.readErr(err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return protoErr("first frame after the preface is not SETTINGS")
	}
	if err := sc.applySettings(sf); err != nil {
		return err
	}
	sc.nc.SetReadDeadline(time.Time{})
	return nil
}

// ---- roleHooks ----

func (sc *serverConn) isIdle(id uint32) bool {
	if id%2 == 0 {
		return true
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return id > sc.maxPeerID
}

func (sc *serverConn) dataEnded() error { return io.EOF }

func (sc *serverConn) lostErr(cause error) error {
	return status.Errorf(codes.Unavailable, "h2grpc: connection from %s lost: %v", sc.nc.RemoteAddr(), cause)
}

func (sc *serverConn) resetErr(code http2.ErrCode) error {
	return status.Errorf(errCodeToGRPC(code), "h2grpc: stream reset by client: %v", code)
}

func (sc *serverConn) onGoAway(f *http2.GoAwayFrame) {
	sc.log.Debug("client sent GOAWAY", zap.Stringer("code", f.ErrCode), zap.ByteString("debug", f.DebugData()))
}

func (sc *serverConn) headersRejected(id uint32) {
	sc.mu.Lock()
	if id%2 == 1 && id > sc.maxPeerID {
		sc.maxPeerID = id
	}
	sc.mu.Unlock()
}

func (sc *serverConn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	sc.mu.Lock()
	if st := sc.streams[id]; st != nil {
		sc.mu.Unlock()
		sc.onTrailers(st, f)
		return nil
	}
	if id%2 == 0 {
		sc.mu.Unlock()
		return protoErr("client opened even stream %d", id)
	}
	if id <= sc.maxPeerID {
		sc.mu.Unlock()
		if sc.wasReset(id) {
			return nil // trailers sent before the client saw our RST_STREAM
		}
		return connError{http2.ErrCodeStreamClosed, fmt.Sprintf("HEADERS on closed stream %d", id)}
	}
	sc.maxPeerID = id
	refuse := sc.goAwaySent || sc.closed || uint32(len(sc.streams)) >= sc.srv.cfg.MaxConcurrentStreams
	sc.mu.Unlock()
	if refuse {
		sc.sendRST(id, http2.ErrCodeRefusedStream)
		return nil
	}
	if f.Truncated {
		sc.sendRST(id, http2.ErrCodeProtocol)
		return nil
	}
	wantLen, err := checkRequest(f)
	if err != nil {
		sc.log.Debug("resetting malformed request", zap.Uint32("stream", id), zap.Error(err))
		sc.sendRST(id, http2.ErrCodeProtocol)
		return nil
	}

	ss := &ServerStream{
		method: f.PseudoValue("path"),
		header: make(map[string][]string),
	}
	for _, hf := range f.RegularFields() {
		ss.header[hf.Name] = append(ss.header[hf.Name], hf.Value)
	}
	handle := sc.srv.cfg.Handle
	if sc.srv.serveAll {
		// Test hook: no gRPC checks.
	} else if m := f.PseudoValue("method"); m != "POST" {
		handle = reject(codes.Internal, fmt.Sprintf("h2grpc: method %q, gRPC requires POST", m))
	} else if ct := first(ss.header["content-type"]); !isGRPCContentType(ct) {
		handle = reject(codes.Internal, fmt.Sprintf("h2grpc: content-type %q is not gRPC", ct))
	}

	st := sc.newStream(id)
	st.dataAllowed = true
	st.wantLen = wantLen
	ss.st = st
	ss.ctx, ss.cancel = context.WithCancelCause(sc.srv.ctx)
	st.onEnd = func(err error) { ss.cancel(err) }
	if f.StreamEnded() {
		st.recvDone, st.recvHalfClosed, st.recvErr = true, true, io.EOF
	}
	sc.mu.Lock()
	if sc.closed {
		sc.mu.Unlock()
		ss.cancel(errConnClosed)
		return nil
	}
	st.sendWindow = sc.peerInitWindow
	sc.streams[id] = st
	sc.mu.Unlock()

	sc.srv.wg.Add(1)
	go func() {
		defer sc.srv.wg.Done()
		ss.finish(handle(ss))
	}()
	return nil
}

// onTrailers handles a header block on an open stream: request trailers,
// which gRPC clients do not send but which end the request body.
func (sc *serverConn) onTrailers(st *stream, f *http2.MetaHeadersFrame) {
	st.mu.Lock()
	halfClosed, lenOK := st.recvHalfClosed, st.wantLen < 0 || st.gotLen == st.wantLen
	st.mu.Unlock()
	var code http2.ErrCode
	switch {
	case halfClosed:
		code = http2.ErrCodeStreamClosed // RFC 9113 §5.1, half-closed (remote)
	case !f.StreamEnded(), len(f.PseudoFields()) > 0, !lenOK, selfDependent(f):
		code = http2.ErrCodeProtocol // RFC 9113 §8.1: malformed; §5.3.1
	}
	if code != 0 {
		sc.resetStream(st.id, code, status.Errorf(codes.Internal, "h2grpc: stream %d: bad request trailers: %v", st.id, code))
		return
	}
	st.mu.Lock()
	if !st.recvDone {
		st.recvDone, st.recvHalfClosed, st.recvErr = true, true, io.EOF
	}
	st.mu.Unlock()
	st.signal()
}

// checkRequest returns the request's content-length (-1 = none), or why
// its header block is malformed (RFC 9113 §8.2.2, §8.3.1, §8.1.1), which
// the caller answers with RST_STREAM(PROTOCOL_ERROR). The Framer has
// already checked field names and values and the order and uniqueness of
// pseudo-headers.
func checkRequest(f *http2.MetaHeadersFrame) (int64, error) {
	var method, scheme, path bool
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			method = hf.Value != ""
		case ":scheme":
			scheme = hf.Value != ""
		case ":path":
			path = hf.Value != ""
		case ":authority":
		default: // :status, or :protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL
			return -1, fmt.Errorf("pseudo-header %s in a request", hf.Name)
		}
	}
	if selfDependent(f) {
		return -1, errors.New("the stream depends on itself")
	}
	if !method || !scheme || !path {
		return -1, errors.New("request without a non-empty :method, :scheme and :path")
	}
	wantLen := int64(-1)
	for _, hf := range f.RegularFields() {
		switch hf.Name {
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
			return -1, fmt.Errorf("connection-specific header field %s", hf.Name)
		case "te":
			if hf.Value != "trailers" {
				return -1, fmt.Errorf("te: %q, only \"trailers\" is allowed", hf.Value)
			}
		case "content-length":
			n, err := strconv.ParseInt(hf.Value, 10, 64)
			if err != nil || n < 0 || wantLen >= 0 && n != wantLen {
				return -1, fmt.Errorf("content-length: %q", hf.Value)
			}
			wantLen = n
		}
	}
	if f.StreamEnded() && wantLen > 0 {
		return -1, fmt.Errorf("content-length: %d on a request without a body", wantLen)
	}
	return wantLen, nil
}

// selfDependent reports a PRIORITY flag that makes the stream depend on
// itself (RFC 9113 §5.3.1: a stream error).
func selfDependent(f *http2.MetaHeadersFrame) bool {
	return f.HasPriority() && f.Priority.StreamDep == f.StreamID
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func reject(c codes.Code, msg string) func(*ServerStream) error {
	return func(*ServerStream) error { return status.Error(c, msg) }
}

// ServerStream is one request stream on the Server. Read may run in one
// goroutine while Write/Flush run in another; neither is safe for concurrent
// use with itself.
type ServerStream struct {
	st          *stream
	method      string
	header      map[string][]string
	ctx         context.Context
	cancel      context.CancelCauseFunc
	headersSent bool // handler goroutine only
}

// Method returns the request's :path, e.g.
// "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources".
func (ss *ServerStream) Method() string { return ss.method }

// Header returns the request headers as sent (lower-case names, values as on
// the wire: "-bin" values stay base64), pseudo-headers excluded.
func (ss *ServerStream) Header() map[string][]string { return ss.header }

// Context is done on RST_STREAM from the client, connection loss, Stop, or
// when Handle returns.
func (ss *ServerStream) Context() context.Context { return ss.ctx }

// Read reads request body bytes as they arrive; io.EOF after the client's
// END_STREAM. Consumed bytes are returned to the client's flow-control windows.
func (ss *ServerStream) Read(p []byte) (int, error) { return ss.st.read(p) }

var responseHeaders = []hpack.HeaderField{
	{Name: ":status", Value: "200"},
	{Name: "content-type", Value: "application/grpc"},
}

func (ss *ServerStream) sendHeaders() error {
	if ss.headersSent {
		return nil
	}
	c := ss.st.c
	c.mu.Lock()
	err := ss.st.sendErr
	c.mu.Unlock()
	if err != nil {
		return err
	}
	ss.headersSent = true
	c.wmu.Lock()
	err = c.writeHeadersLocked(ss.st.id, responseHeaders, false)
	c.unlockW()
	if err != nil {
		return c.role.lostErr(err)
	}
	return nil
}

// Write queues response body bytes, after the response headers if they were
// not sent yet. It blocks while the client's windows are exhausted. Nothing
// is guaranteed on the wire before Flush.
func (ss *ServerStream) Write(p []byte) (int, error) {
	if err := ss.sendHeaders(); err != nil {
		return 0, err
	}
	return ss.st.write(p)
}

// WriteBuffers writes bufs as response body bytes and flushes, like Write of
// their concatenation then Flush; on a plain socket the bytes go from bufs
// to the kernel without a copy. bufs itself may be modified, its byte
// slices are not, and neither is kept after return.
func (ss *ServerStream) WriteBuffers(bufs [][]byte) error {
	if err := ss.sendHeaders(); err != nil {
		return err
	}
	return ss.st.writeBuffers(bufs)
}

// Flush sends the response headers if not sent yet, and everything queued.
func (ss *ServerStream) Flush() error {
	if err := ss.sendHeaders(); err != nil {
		return err
	}
	return ss.st.c.flush()
}

// finish ends the stream after Handle returned: trailers (trailers-only when
// nothing was sent), RST_STREAM(NO_ERROR) if the client is still sending.
func (ss *ServerStream) finish(herr error) {
	st, c := ss.st, ss.st.c
	st.mu.Lock()
	stillSending := !st.recvDone
	st.mu.Unlock()
	c.mu.Lock()
	alive := st.sendErr == nil && !c.closed
	if alive && stillSending {
		c.noteResetLocked(st.id) // its late frames are ignored
	}
	c.mu.Unlock()
	// The stream leaves the table before its last frame goes out: a client
	// that has seen END_STREAM and sends HEADERS on the stream again is then
	// answered as for any closed stream (RFC 9113 §5.1), never as if the
	// stream were still open.
	c.removeStream(st)
	if alive {
		s := statusFromError(herr)
		fields := make([]hpack.HeaderField, 0, 5)
		if !ss.headersSent {
			fields = append(fields, responseHeaders...)
		}
		fields = append(fields, hpack.HeaderField{Name: "grpc-status", Value: strconv.Itoa(int(s.Code()))})
		if m := s.Message(); m != "" {
			fields = append(fields, hpack.HeaderField{Name: "grpc-message", Value: encodeGRPCMessage(m)})
		}
		if d := encodeStatusDetails(s); d != "" {
			fields = append(fields, hpack.HeaderField{Name: "grpc-status-details-bin", Value: d})
		}
		c.wmu.Lock()
		if c.writeHeadersLocked(st.id, fields, true) == nil {
			if stillSending {
				c.wfr.WriteRSTStream(st.id, http2.ErrCodeNo)
			}
			c.flushLocked()
		}
		c.unlockW()
	}
	st.terminate(status.Error(codes.Canceled, "h2grpc: handler returned"), true)
}
