package h2grpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// DialConfig configures Dial.
type DialConfig struct {
	// Address is the server's host:port.
	Address string
	// TLS, when set, secures the connection; "h2" is added to NextProtos (on
	// a clone) and the server must negotiate it. nil = plaintext HTTP/2 with
	// prior knowledge (h2c).
	TLS *tls.Config
	// Authority is sent as :authority. Default Address.
	Authority string
	// KeepaliveInterval: when nothing has been received for this long, send
	// a PING; no ACK (or any other frame) within KeepaliveTimeout closes the
	// connection and fails its streams with codes.Unavailable. Zero = no
	// pings. The server's keepalive enforcement must allow the interval.
	KeepaliveInterval, KeepaliveTimeout time.Duration
	// Window is the receive window advertised per stream and for the
	// connection. 0 = 4 MiB.
	Window int32
	// Dialer opens the transport connection. nil = net.Dialer.
	Dialer func(ctx context.Context, network, addr string) (net.Conn, error)
	// Log receives connection-level events. nil = no logging.
	Log *zap.Logger
}

// ClientConn is one HTTP/2 connection to a gRPC server.
type ClientConn struct {
	*conn
	cfg        DialConfig
	scheme     string
	readerDone chan struct{}

	// Under conn.mu.
	nextID     uint32
	goAwayRecv bool
}

// Dial connects, does TLS if configured, sends the preface and SETTINGS, and
// returns once the server's SETTINGS arrived (or ctx ends).
func Dial(ctx context.Context, cfg DialConfig) (*ClientConn, error) {
	if cfg.Window <= 0 {
		cfg.Window = defaultWindow
	}
	if cfg.Authority == "" {
		cfg.Authority = cfg.Address
	}
	if cfg.KeepaliveInterval > 0 && cfg.KeepaliveTimeout <= 0 {
		cfg.KeepaliveTimeout = 20 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = zap.NewNop()
	}
	dial := cfg.Dialer
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	nc, err := dial(ctx, "tcp", cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("h2grpc: dial %s: %w", cfg.Address, err)
	}
	cc, err := handshakeClient(ctx, nc, cfg, log.Named("h2grpc").With(zap.String("server", cfg.Address)))
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("h2grpc: dial %s: %w", cfg.Address, err)
	}
	return cc, nil
}

func handshakeClient(ctx context.Context, nc net.Conn, cfg DialConfig, log *zap.Logger) (*ClientConn, error) {
	// ctx bounds the whole handshake through the connection's deadline.
	if d, ok := ctx.Deadline(); ok {
		nc.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	fail := func(err error) error {
		if ctx.Err() != nil {
			return fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
			// The connection deadline can fire before ctx's own timer.
			return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
		}
		return err
	}

	scheme := "http"
	if cfg.TLS != nil {
		tc := cfg.TLS.Clone()
		tc.NextProtos = append([]string{"h2"}, deleteString(tc.NextProtos, "h2")...)
		if tc.ServerName == "" {
			if host, _, err := net.SplitHostPort(cfg.Address); err == nil {
				tc.ServerName = host
			}
		}
		tlsConn := tls.Client(nc, tc)
		if err := tlsConn.HandshakeContext(ctx); err != nil {
			if strings.Contains(err.Error(), "no application protocol") {
				return nil, fmt.Errorf("server did not negotiate HTTP/2 over TLS (no ALPN \"h2\"): is it a gRPC server? %w", err)
			}
			return nil, fail(fmt.Errorf("TLS handshake: %w", err))
		}
		if p := tlsConn.ConnectionState().NegotiatedProtocol; p != "h2" {
			return nil, fmt.Errorf("server did not negotiate HTTP/2 over TLS (ALPN %q, want \"h2\"): is it a gRPC server?", p)
		}
		nc = tlsConn
		scheme = "https"
	}

	cc := &ClientConn{cfg: cfg, scheme: scheme, nextID: 1, readerDone: make(chan struct{})}
	cc.conn = newConn(nc, log, newChunkPool(), slabs, int64(cfg.Window), cfg.KeepaliveInterval, cfg.KeepaliveTimeout)
	cc.conn.role = cc

	cc.wmu.Lock()
	cc.bw.WriteString(http2.ClientPreface)
	cc.wmu.Unlock()
	err := cc.writeSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(cfg.Window)},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderListSize},
	)
	if err != nil {
		return nil, fail(fmt.Errorf("send preface: %w", err))
	}
	f, err := cc.rfr.ReadFrame()
	if err != nil {
		return nil, fail(fmt.Errorf("read server SETTINGS: %w", err))
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return nil, fmt.Errorf("server's first frame is %v, not SETTINGS: is it an HTTP/2 server?", f.Header().Type)
	}
	if err := cc.applySettings(sf); err != nil {
		return nil, fmt.Errorf("server SETTINGS: %w", err)
	}
	if !stop() {
		return nil, ctx.Err()
	}
	nc.SetDeadline(time.Time{})
	cc.lastRead.Store(int64(time.Since(cc.start)))
	cc.startKeepalive()
	go cc.readLoopClient()
	return cc, nil
}

func deleteString(s []string, v string) []string {
	out := make([]string, 0, len(s))
	for _, x := range s {
		if x != v {
			out = append(out, x)
		}
	}
	return out
}

func (cc *ClientConn) readLoopClient() {
	defer close(cc.readerDone)
	err := cc.readLoop()
	var ce connError
	if errors.As(err, &ce) {
		cc.log.Warn("closing connection on protocol error", zap.Error(err))
		cc.goAway(ce.code, 0, ce.reason)
	}
	cc.close(err)
}

// Close sends GOAWAY and closes the connection; open streams fail with
// codes.Unavailable.
func (cc *ClientConn) Close() error {
	cc.goAway(http2.ErrCodeNo, 0, "client closing")
	cc.close(errors.New("connection closed by the client"))
	<-cc.readerDone
	return nil
}

// reservedHeaders are never taken from md: gRPC/HTTP/2 framing we set, and
// connection-specific headers HTTP/2 forbids.
var reservedHeaders = map[string]bool{
	"content-type": true, "te": true, "connection": true, "keep-alive": true,
	"proxy-connection": true, "transfer-encoding": true, "upgrade": true, "host": true,
}

// NewStream opens a stream: HEADERS with :method POST, :scheme, :path method,
// :authority, content-type application/grpc, te trailers, then md (keys
// lower-cased, values sent as given). It waits for a slot under the server's
// SETTINGS_MAX_CONCURRENT_STREAMS. Cancelling ctx resets the stream
// (RST_STREAM CANCEL) and fails it with codes.Canceled.
func (cc *ClientConn) NewStream(ctx context.Context, method string, md map[string]string) (*ClientStream, error) {
	fields := make([]hpack.HeaderField, 0, 6+len(md))
	fields = append(fields,
		hpack.HeaderField{Name: ":method", Value: "POST"},
		hpack.HeaderField{Name: ":scheme", Value: cc.scheme},
		hpack.HeaderField{Name: ":path", Value: method},
		hpack.HeaderField{Name: ":authority", Value: cc.cfg.Authority},
		hpack.HeaderField{Name: "content-type", Value: "application/grpc"},
		hpack.HeaderField{Name: "te", Value: "trailers"},
	)
	for k, v := range md {
		k = strings.ToLower(k)
		if strings.HasPrefix(k, ":") || reservedHeaders[k] {
			continue
		}
		if !httpguts.ValidHeaderFieldName(k) || !httpguts.ValidHeaderFieldValue(v) {
			return nil, status.Errorf(codes.Internal, "h2grpc: metadata %q: invalid header name or value", k)
		}
		fields = append(fields, hpack.HeaderField{Name: k, Value: v})
	}

	for {
		if err := cc.waitSlot(ctx); err != nil {
			return nil, err
		}
		cc.wmu.Lock()
		cc.mu.Lock()
		if err := cc.usableLocked(); err != nil {
			cc.mu.Unlock()
			cc.unlockW()
			return nil, err
		}
		if uint32(len(cc.streams)) >= cc.peerMaxStreams {
			cc.mu.Unlock() // taken meanwhile: wait again
			cc.unlockW()
			continue
		}
		if cc.nextID > 1<<31-1 {
			cc.goAwayRecv = true
			cc.mu.Unlock()
			cc.unlockW()
			return nil, status.Error(codes.Unavailable, "h2grpc: stream IDs exhausted on this connection; dial a new one")
		}
		id := cc.nextID
		cc.nextID += 2
		st := cc.newStream(id)
		st.sendWindow = cc.peerInitWindow
		cs := &ClientStream{st: st, cc: cc}
		st.onRecvClosed = func() { cc.streamEnded(st) }
		cc.streams[id] = st
		cc.mu.Unlock()
		err := cc.writeHeadersLocked(id, fields, false)
		if err == nil {
			err = cc.flushLocked()
		}
		cc.unlockW()
		if err != nil {
			return nil, cc.lostErr(err)
		}
		stopCtx := context.AfterFunc(ctx, func() {
			cc.resetStream(id, http2.ErrCodeCancel, status.FromContextError(ctx.Err()).Err())
		})
		st.onEnd = func(error) { stopCtx() }
		st.mu.Lock()
		ended := st.ended
		st.mu.Unlock()
		if ended {
			stopCtx()
		}
		return cs, nil
	}
}

// waitSlot waits until the connection could take one more stream.
func (cc *ClientConn) waitSlot(ctx context.Context) error {
	cc.mu.Lock()
	for {
		if err := cc.usableLocked(); err != nil {
			cc.mu.Unlock()
			return err
		}
		if uint32(len(cc.streams)) < cc.peerMaxStreams {
			cc.mu.Unlock()
			return nil
		}
		wake := cc.wake
		cc.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
		cc.mu.Lock()
	}
}

func (cc *ClientConn) usableLocked() error {
	if cc.closed {
		return cc.lostErr(cc.closeErr)
	}
	if cc.goAwayRecv {
		return status.Errorf(codes.Unavailable, "h2grpc: %s sent GOAWAY: no new streams on this connection", cc.cfg.Address)
	}
	return nil
}

// ---- roleHooks ----

func (cc *ClientConn) isIdle(id uint32) bool {
	if id%2 == 0 {
		return true // push is disabled: the server opens no streams
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return id >= cc.nextID
}

func (cc *ClientConn) headersRejected(uint32) {}

func (cc *ClientConn) dataEnded() error {
	return status.Error(codes.Internal, "h2grpc: server ended the stream without trailers")
}

func (cc *ClientConn) lostErr(cause error) error {
	return status.Errorf(codes.Unavailable, "h2grpc: connection to %s lost: %v", cc.cfg.Address, cause)
}

func (cc *ClientConn) resetErr(code http2.ErrCode) error {
	return status.Errorf(errCodeToGRPC(code), "h2grpc: stream reset by server: %v", code)
}

func (cc *ClientConn) onGoAway(f *http2.GoAwayFrame) {
	cc.log.Info("server sent GOAWAY", zap.Stringer("code", f.ErrCode),
		zap.Uint32("lastStreamID", f.LastStreamID), zap.ByteString("debug", f.DebugData()))
	err := status.Errorf(codes.Unavailable, "h2grpc: %s sent GOAWAY (%v, %q) before processing the stream",
		cc.cfg.Address, f.ErrCode, f.DebugData())
	cc.mu.Lock()
	cc.goAwayRecv = true
	var refused []*stream
	for id, st := range cc.streams {
		if id > f.LastStreamID {
			refused = append(refused, st)
			delete(cc.streams, id)
		}
	}
	cc.broadcastLocked()
	cc.mu.Unlock()
	for _, st := range refused {
		st.terminate(err, true)
	}
}

func (cc *ClientConn) onHeaders(f *http2.MetaHeadersFrame) error {
	st := cc.stream(f.StreamID)
	if st == nil {
		if cc.isIdle(f.StreamID) {
			return protoErr("HEADERS for idle stream %d", f.StreamID)
		}
		return nil
	}
	end := f.StreamEnded()
	st.mu.Lock()
	initial := !st.dataAllowed
	st.mu.Unlock()
	if !initial && !end {
		cc.resetStream(st.id, http2.ErrCodeProtocol, status.Error(codes.Internal, "h2grpc: HEADERS in the middle of a response"))
		return nil
	}
	if f.Truncated {
		cc.resetStream(st.id, http2.ErrCodeFrameSize, status.Error(codes.Internal, "h2grpc: response headers exceed the header list size limit"))
		return nil
	}
	var (
		isGRPC             = !initial
		httpStatus, ct     string
		code, msg, details string
		haveCode, haveCT   bool
	)
	for _, hf := range f.Fields {
		switch hf.Name {
		case ":status":
			httpStatus = hf.Value
		case "content-type":
			ct, haveCT = hf.Value, true
			if isGRPCContentType(hf.Value) {
				isGRPC = true
			}
		case "grpc-status":
			code, haveCode = hf.Value, true
		case "grpc-message":
			msg = hf.Value
		case "grpc-status-details-bin":
			details = hf.Value
		}
	}
	if !isGRPC {
		// As grpc-go: the HTTP status decides the code.
		c := codes.Internal
		var errs []string
		if httpStatus == "" {
			errs = append(errs, "malformed header: missing HTTP status")
		} else {
			n, err := strconv.Atoi(httpStatus)
			if err != nil {
				cc.resetStream(st.id, http2.ErrCodeProtocol, status.Errorf(codes.Internal, "h2grpc: malformed :status %q", httpStatus))
				return nil
			}
			if n >= 100 && n < 200 && !end {
				return nil // informational
			}
			c = httpStatusToGRPC(n)
			errs = append(errs, fmt.Sprintf("unexpected HTTP status code received from server: %d", n))
		}
		if haveCT {
			errs = append(errs, fmt.Sprintf("unexpected content-type %q", ct))
		} else {
			errs = append(errs, "missing HTTP content-type")
		}
		cc.resetStream(st.id, http2.ErrCodeProtocol, status.Error(c, "h2grpc: "+strings.Join(errs, "; ")))
		return nil
	}
	if !end {
		st.mu.Lock()
		st.dataAllowed = true
		st.mu.Unlock()
		return nil
	}
	s := statusFromTrailers(code, msg, details, haveCode)
	var err error = io.EOF
	if s.Code() != codes.OK {
		err = s.Err()
	}
	st.mu.Lock()
	st.dataAllowed = true
	if !st.recvDone {
		st.recvDone, st.recvHalfClosed, st.recvErr = true, true, err
	}
	st.mu.Unlock()
	// Writes fail before Read can report the end.
	cc.streamEnded(st)
	return nil
}

// ClientStream is one stream on a ClientConn. Read may run in one goroutine
// while Write/Flush/CloseSend run in another; neither is safe for concurrent
// use with itself.
type ClientStream struct {
	st *stream
	cc *ClientConn
}

// ended releases the stream once the server has finished it: writes now
// fail with io.EOF (the outcome is Read's), and a client still sending
// resets its side as grpc-go does.
func (cc *ClientConn) streamEnded(st *stream) {
	cc.mu.Lock()
	stillSending := !st.sendClosed && st.sendErr == nil
	if st.sendErr == nil {
		st.sendErr = io.EOF
	}
	cc.broadcastLocked()
	cc.mu.Unlock()
	cc.removeStream(st)
	if stillSending {
		cc.sendRST(st.id, http2.ErrCodeNo)
	}
	st.terminate(io.EOF, false)
}

// Write queues request body bytes, blocking while the server's windows are
// exhausted; nothing is guaranteed on the wire before Flush. After the server
// ended the stream it returns io.EOF: Read gives the status.
func (cs *ClientStream) Write(p []byte) (int, error) {
	cc := cs.cc
	cc.mu.Lock()
	closed := cs.st.sendClosed
	cc.mu.Unlock()
	if closed {
		return 0, status.Error(codes.Internal, "h2grpc: Write after CloseSend")
	}
	return cs.st.write(p)
}

// Flush sends everything queued on the connection.
func (cs *ClientStream) Flush() error { return cs.cc.flush() }

// CloseSend ends the request body (END_STREAM) and flushes.
func (cs *ClientStream) CloseSend() error {
	st, cc := cs.st, cs.cc
	cc.mu.Lock()
	if st.sendClosed {
		cc.mu.Unlock()
		return nil
	}
	if st.sendErr != nil {
		err := st.sendErr
		cc.mu.Unlock()
		return err
	}
	st.sendClosed = true
	cc.mu.Unlock()
	cc.wmu.Lock()
	err := cc.writeDataLocked(st.id, nil, true)
	if err == nil {
		err = cc.flushLocked()
	}
	cc.unlockW()
	if err != nil {
		return cc.lostErr(err)
	}
	return nil
}

// Read reads response body bytes as they arrive. At the end of the stream it
// returns io.EOF when grpc-status was 0, else the status as a grpc status
// error; a reset, GOAWAY, lost connection or cancelled context give the
// matching status error (see the package tests for the mapping).
func (cs *ClientStream) Read(p []byte) (int, error) { return cs.st.read(p) }

// ReadBuffers is Read without a copy: it appends to dst up to max bytes (at
// least one) of what has arrived, handing over the receive buffers
// themselves where it can. The caller owns the appended buffers and frees
// each (mem.Buffer.Free) when done. Errors as Read.
func (cs *ClientStream) ReadBuffers(dst mem.BufferSlice, max int) (mem.BufferSlice, error) {
	return cs.st.readBuffers(dst, max)
}

// ReadAhead lets the server send the next n bytes of the stream without
// waiting for window updates, when that is more than the window allows: a
// reader that is going to hold a whole message of n bytes anyway grants
// it at once instead of a window at a time (each wait for a window update
// stalls the sender). The extra credit is not renewed: once it is used
// the stream is back to its usual window.
func (cs *ClientStream) ReadAhead(n int) { cs.st.readAhead(int64(n)) }
