package h2grpc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// defaultWindow is the stream and connection receive window we advertise.
	defaultWindow = 4 << 20
	// ioBufSize is the size of the per-connection read and write buffers.
	ioBufSize = 64 << 10
	// maxVecReservation caps how much one writev (writeBuffers) sends under
	// the writer lock.
	maxVecReservation = 256 << 10
	// maxReservation caps how much one Write sends under the writer lock, so
	// streams sharing a connection take turns.
	maxReservation = 64 << 10
	// maxHeaderListSize is the SETTINGS_MAX_HEADER_LIST_SIZE we advertise and
	// enforce; far above what xDS metadata needs, far below memory trouble.
	maxHeaderListSize = 1 << 20
	// hpackTableSize is the largest HPACK dynamic table our encoder uses
	// (HTTP/2's initial SETTINGS_HEADER_TABLE_SIZE).
	hpackTableSize = 4096
	// rfcInitialWindow is HTTP/2's initial window before any SETTINGS.
	rfcInitialWindow = 65535
	// goAwayWriteTimeout bounds how long closing waits to get a GOAWAY out.
	goAwayWriteTimeout = time.Second
	// resetMemory is how many of the streams we reset most recently are
	// remembered, so frames the peer had in flight on them are ignored.
	resetMemory = 64
)

// connError is a protocol error of the peer: we answer with GOAWAY(code).
type connError struct {
	code   http2.ErrCode
	reason string
}

func (e connError) Error() string { return fmt.Sprintf("h2grpc: %v: %s", e.code, e.reason) }

func protoErr(format string, args ...any) error {
	return connError{http2.ErrCodeProtocol, fmt.Sprintf(format, args...)}
}

// roleHooks are the parts of frame handling that differ between the client
// and the server side of a connection.
type roleHooks interface {
	// onHeaders handles a complete header block (HEADERS + CONTINUATION).
	onHeaders(f *http2.MetaHeadersFrame) error
	// onGoAway handles the peer's GOAWAY.
	onGoAway(f *http2.GoAwayFrame)
	// isIdle reports whether id names a stream that was never opened.
	isIdle(id uint32) bool
	// dataEnded is the error Read returns after a DATA frame with END_STREAM.
	dataEnded() error
	// lostErr is the error streams end with when the connection goes.
	lostErr(cause error) error
	// resetErr is the error a stream ends with on the peer's RST_STREAM.
	resetErr(code http2.ErrCode) error
	// headersRejected notes a header block the Framer rejected as
	// malformed (the stream is reset): if it opened a stream, that stream
	// is no longer idle.
	headersRejected(id uint32)
}

// conn is the connection machinery shared by both roles.
type conn struct {
	nc   net.Conn
	log  *zap.Logger
	role roleHooks
	pool *sync.Pool
	// slabs recycles read buffers (shared like pool).
	slabs *slabPool

	// Read side: the reader goroutine only.
	br          *slabReader
	rfr         *http2.Framer
	scratch     []byte
	recvWindow  int64 // stream window we advertise
	connWindow  int64 // connection window we advertise
	connAvail   int64 // connection bytes the peer may still send
	connUnacked int64 // received bytes not yet returned to the peer

	// Write side, under wmu.
	wmu      sync.Mutex
	bw       *bufio.Writer
	wfr      *http2.Framer
	henc     *hpack.Encoder
	hbuf     bytes.Buffer
	hdr      [9]byte
	werr     error
	ctlOut   []byte
	vectored bool     // nc takes writev (net.Buffers): a plain socket
	iov      [][]byte // writeVecLocked's scratch
	vhdr     []byte   // frame headers of one writev
	// The peer's SETTINGS_HEADER_TABLE_SIZE values not yet applied to
	// henc: the lowest and the last (RFC 7541 §4.2: the next header block
	// must signal the lowest one if the table shrank in between).
	tableMu      sync.Mutex
	tablePending atomic.Bool
	tableMin     uint32
	tableLast    uint32
	peerMaxFrm   atomic.Uint32

	// Control frames queued by goroutines that must not block on wmu.
	ctlMu      sync.Mutex
	ctlBuf     bytes.Buffer
	ctlFr      *http2.Framer
	ctlPending atomic.Bool

	mu             sync.Mutex
	streams        map[uint32]*stream
	sendWindow     int64 // connection send window
	peerInitWindow int64
	peerMaxStreams uint32
	wake           chan struct{} // closed and replaced on every window or stream change
	closed         bool
	closeErr       error
	goAwaySent     bool
	// resets holds the last resetMemory stream IDs we sent RST_STREAM for
	// (a ring; 0 = empty slot). RFC 9113 §5.1: frames the peer sent before
	// it saw our RST_STREAM are ignored; frames on other closed streams are
	// errors (STREAM_CLOSED). A stream forgotten here gets a harmless
	// RST_STREAM(STREAM_CLOSED) for late frames (the RFC lets us bound how
	// long we ignore them).
	resets    [resetMemory]uint32
	resetNext int

	// Keepalive.
	kaInterval, kaTimeout time.Duration
	start                 time.Time
	lastRead              atomic.Int64 // since start, ns
	kaMu                  sync.Mutex
	kaTimer               *time.Timer
	pingOut               bool
	pingSentAt            int64
	pingData              [8]byte

	done chan struct{}
}

func newConn(nc net.Conn, log *zap.Logger, pool *sync.Pool, slabs *slabPool, window int64, kaInterval, kaTimeout time.Duration) *conn {
	c := &conn{
		nc:             nc,
		log:            log,
		pool:           pool,
		slabs:          slabs,
		br:             newSlabReader(nc, slabs),
		scratch:        make([]byte, chunkSize),
		recvWindow:     window,
		connWindow:     window,
		connAvail:      window,
		bw:             bufio.NewWriterSize(nc, ioBufSize),
		streams:        make(map[uint32]*stream),
		sendWindow:     rfcInitialWindow,
		peerInitWindow: rfcInitialWindow,
		peerMaxStreams: math.MaxUint32,
		wake:           make(chan struct{}),
		kaInterval:     kaInterval,
		kaTimeout:      kaTimeout,
		start:          time.Now(),
		done:           make(chan struct{}),
	}
	switch nc.(type) {
	case *net.TCPConn, *net.UnixConn:
		c.vectored = true
	}
	c.rfr = http2.NewFramer(nil, c.br)
	c.rfr.SetMaxReadFrameSize(chunkSize)
	c.rfr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.rfr.MaxHeaderListSize = maxHeaderListSize
	c.wfr = http2.NewFramer(c.bw, nil)
	c.ctlFr = http2.NewFramer(&c.ctlBuf, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.peerMaxFrm.Store(16384)
	return c
}

// writePreface queues our SETTINGS and the connection WINDOW_UPDATE that
// lifts the connection window from 65535 to ours (the client also writes
// the preface string first).
func (c *conn) writeSettings(settings ...http2.Setting) error {
	c.wmu.Lock()
	defer c.unlockW()
	c.wfr.WriteSettings(settings...)
	if d := c.connWindow - rfcInitialWindow; d > 0 {
		c.wfr.WriteWindowUpdate(0, uint32(d))
	}
	return c.flushLocked()
}

// broadcastLocked wakes every goroutine waiting for a window or stream slot.
// c.mu held.
func (c *conn) broadcastLocked() {
	close(c.wake)
	c.wake = make(chan struct{})
}

// ---- writing ----

// unlockW releases wmu, first sending any queued control frames, and takes
// over control frames queued while it was releasing.
func (c *conn) unlockW() {
	for {
		if c.ctlPending.Load() {
			c.drainCtlLocked()
		}
		c.wmu.Unlock()
		if !c.ctlPending.Load() || !c.wmu.TryLock() {
			return
		}
	}
}

func (c *conn) drainCtlLocked() {
	c.ctlMu.Lock()
	c.ctlPending.Store(false)
	c.ctlOut = append(c.ctlOut[:0], c.ctlBuf.Bytes()...)
	c.ctlBuf.Reset()
	c.ctlMu.Unlock()
	if c.werr != nil || len(c.ctlOut) == 0 {
		return
	}
	_, err := c.bw.Write(c.ctlOut)
	if err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		c.writeFailedLocked(err)
	}
}

// queueCtl queues a control frame and sends it now unless another goroutine
// holds the writer, which then sends it before letting go.
func (c *conn) queueCtl(write func(fr *http2.Framer)) {
	c.ctlMu.Lock()
	write(c.ctlFr)
	c.ctlPending.Store(true)
	c.ctlMu.Unlock()
	if c.wmu.TryLock() {
		c.unlockW()
	}
}

func (c *conn) flushLocked() error {
	if c.werr != nil {
		return c.werr
	}
	if err := c.bw.Flush(); err != nil {
		c.writeFailedLocked(err)
		return err
	}
	return nil
}

// writeFailedLocked records a write error and closes the connection. wmu held.
func (c *conn) writeFailedLocked(err error) {
	if c.werr == nil {
		c.werr = err
	}
	c.close(fmt.Errorf("write: %w", err))
}

// flush writes out everything buffered.
func (c *conn) flush() error {
	c.wmu.Lock()
	err := c.flushLocked()
	c.unlockW()
	if err != nil {
		return c.role.lostErr(err)
	}
	return nil
}

// writeHeadersLocked HPACK-encodes fields into HEADERS (+ CONTINUATION)
// frames. wmu held; encoding and writing happen under the same hold so the
// peer's decoder sees blocks in the encoder's order.
func (c *conn) writeHeadersLocked(id uint32, fields []hpack.HeaderField, end bool) error {
	if c.werr != nil {
		return c.werr
	}
	if c.tablePending.Load() {
		c.applyTableSizeLocked()
	}
	c.hbuf.Reset()
	for _, f := range fields {
		if err := c.henc.WriteField(f); err != nil {
			return err
		}
	}
	block := c.hbuf.Bytes()
	maxF := int(c.peerMaxFrm.Load())
	first := block
	if len(first) > maxF {
		first = block[:maxF]
	}
	block = block[len(first):]
	err := c.wfr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(block) == 0,
	})
	for err == nil && len(block) > 0 {
		frag := block[:min(len(block), maxF)]
		block = block[len(frag):]
		err = c.wfr.WriteContinuation(id, len(block) == 0, frag)
	}
	if err != nil {
		c.writeFailedLocked(err)
	}
	return err
}

// applyTableSizeLocked makes the encoder follow the peer's
// SETTINGS_HEADER_TABLE_SIZE changes: the next header block starts with a
// dynamic table size update to the lowest value announced since the last
// block (RFC 7541 §4.2; nghttp2 requires it when the table shrank), capped
// at the 4096 bytes we need. One update only: the x/net decoder (grpc-go's)
// rejects a second one while entries remain, so a table that shrank and
// grew again between two blocks stays at the lower size until the peer
// announces a size again.
func (c *conn) applyTableSizeLocked() {
	c.tableMu.Lock()
	low, last := c.tableMin, c.tableLast
	c.tablePending.Store(false)
	c.tableMu.Unlock()
	c.henc.SetMaxDynamicTableSizeLimit(last)
	c.henc.SetMaxDynamicTableSize(min(low, hpackTableSize))
}

// writeDataLocked writes p as DATA frames of at most the peer's frame size,
// and an empty one with END_STREAM when end is set. wmu held.
func (c *conn) writeDataLocked(id uint32, p []byte, end bool) error {
	if c.werr != nil {
		return c.werr
	}
	maxF := int(c.peerMaxFrm.Load())
	for len(p) > 0 || end {
		k := min(len(p), maxF)
		var flags http2.Flags
		if end && k == len(p) {
			flags = http2.FlagDataEndStream
			end = false
		}
		h := &c.hdr
		h[0], h[1], h[2] = byte(k>>16), byte(k>>8), byte(k)
		h[3], h[4] = byte(http2.FrameData), byte(flags)
		h[5], h[6], h[7], h[8] = byte(id>>24), byte(id>>16), byte(id>>8), byte(id)
		c.bw.Write(h[:])
		if _, err := c.bw.Write(p[:k]); err != nil {
			c.writeFailedLocked(err)
			return err
		}
		p = p[k:]
	}
	return nil
}

// writeVecLocked writes the first n bytes of bufs as DATA frames and
// returns what is left of bufs. On a vectored connection the frames go out
// at once in one writev, straight from bufs, after whatever is buffered;
// else they are buffered as writeDataLocked does. wmu held.
func (c *conn) writeVecLocked(id uint32, bufs [][]byte, n int) ([][]byte, error) {
	if c.werr != nil {
		return nil, c.werr
	}
	if !c.vectored {
		for n > 0 {
			k := min(n, len(bufs[0]))
			if err := c.writeDataLocked(id, bufs[0][:k], false); err != nil {
				return nil, err
			}
			n -= k
			if bufs[0] = bufs[0][k:]; len(bufs[0]) == 0 {
				bufs = bufs[1:]
			}
		}
		return bufs, nil
	}
	if err := c.flushLocked(); err != nil {
		return nil, err
	}
	maxF := int(c.peerMaxFrm.Load())
	frames := (n + maxF - 1) / maxF
	if cap(c.vhdr) < 9*frames {
		c.vhdr = make([]byte, 9*frames)
	}
	hdrs := c.vhdr[:9*frames]
	iov := c.iov[:0]
	for n > 0 {
		k := min(n, maxF)
		h := hdrs[:9:9]
		hdrs = hdrs[9:]
		h[0], h[1], h[2] = byte(k>>16), byte(k>>8), byte(k)
		h[3], h[4] = byte(http2.FrameData), 0
		h[5], h[6], h[7], h[8] = byte(id>>24), byte(id>>16), byte(id>>8), byte(id)
		iov = append(iov, h)
		n -= k
		for k > 0 {
			m := min(k, len(bufs[0]))
			iov = append(iov, bufs[0][:m])
			k -= m
			if bufs[0] = bufs[0][m:]; len(bufs[0]) == 0 {
				bufs = bufs[1:]
			}
		}
	}
	c.iov = iov[:0]
	nb := net.Buffers(iov)
	_, err := nb.WriteTo(c.nc)
	clear(iov)
	if err != nil {
		c.writeFailedLocked(err)
		return nil, err
	}
	return bufs, nil
}

// goAway sends GOAWAY (best effort, bounded by goAwayWriteTimeout).
func (c *conn) goAway(code http2.ErrCode, lastID uint32, debug string) {
	c.mu.Lock()
	c.goAwaySent = true
	c.mu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(goAwayWriteTimeout))
	c.wmu.Lock()
	if c.werr == nil {
		if err := c.wfr.WriteGoAway(lastID, code, []byte(debug)); err == nil {
			c.flushLocked()
		}
	}
	c.unlockW()
}

// close ends the connection and every stream on it. Safe to call many times
// from any goroutine, with or without wmu held.
func (c *conn) close(cause error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.closeErr = cause
	streams := make([]*stream, 0, len(c.streams))
	for _, st := range c.streams {
		streams = append(streams, st)
	}
	clear(c.streams)
	c.broadcastLocked()
	c.mu.Unlock()

	c.nc.Close()
	c.kaMu.Lock()
	if c.kaTimer != nil {
		c.kaTimer.Stop()
	}
	c.kaMu.Unlock()
	err := c.role.lostErr(cause)
	for _, st := range streams {
		st.terminate(err, false)
	}
	close(c.done)
}

// ---- reading ----

// readLoop reads frames until the connection fails. It returns the cause.
func (c *conn) readLoop() error {
	for {
		fh, err := c.rfr.ReadFrameHeader()
		if err != nil {
			return c.readErr(err)
		}
		c.lastRead.Store(int64(time.Since(c.start)))
		if fh.Type == http2.FrameData {
			if err := c.readData(fh); err != nil {
				return err
			}
			continue
		}
		f, err := c.rfr.ReadFrameForHeader(fh)
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				if fh.Type == http2.FrameHeaders {
					c.role.headersRejected(se.StreamID)
				}
				c.resetStream(se.StreamID, se.Code, status.Errorf(codes.Internal, "h2grpc: stream %d: %v", se.StreamID, se))
				continue
			}
			return c.readErr(err)
		}
		if err := c.handleFrame(f); err != nil {
			return err
		}
	}
}

// readErr classifies a Framer error: protocol errors become connError.
func (c *conn) readErr(err error) error {
	var ce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		reason := "invalid frame"
		if d := c.rfr.ErrorDetail(); d != nil {
			reason = d.Error()
		}
		return connError{http2.ErrCode(ce), reason}
	case errors.Is(err, http2.ErrFrameTooLarge):
		return connError{http2.ErrCodeFrameSize, "frame larger than SETTINGS_MAX_FRAME_SIZE"}
	}
	return err
}

func (c *conn) handleFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return c.role.onHeaders(f)
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		return c.applySettings(f)
	case *http2.WindowUpdateFrame:
		return c.windowUpdate(f.StreamID, int64(f.Increment))
	case *http2.PingFrame:
		if f.IsAck() {
			c.pingAcked(f.Data)
			return nil
		}
		data := f.Data
		c.queueCtl(func(fr *http2.Framer) { fr.WritePing(true, data) })
	case *http2.RSTStreamFrame:
		if c.role.isIdle(f.StreamID) {
			return protoErr("RST_STREAM for idle stream %d", f.StreamID)
		}
		if st := c.stream(f.StreamID); st != nil {
			c.removeStream(st)
			st.terminate(c.role.resetErr(f.ErrCode), true)
		}
	case *http2.GoAwayFrame:
		c.role.onGoAway(f)
	case *http2.PushPromiseFrame:
		return protoErr("PUSH_PROMISE is disabled")
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID {
			// RFC 9113 §5.3.1: a stream error, but RST_STREAM must not
			// name an idle stream, so then the whole connection fails.
			if c.role.isIdle(f.StreamID) {
				return protoErr("PRIORITY: idle stream %d depends on itself", f.StreamID)
			}
			c.resetStream(f.StreamID, http2.ErrCodeProtocol, status.Errorf(codes.Internal, "h2grpc: stream %d depends on itself", f.StreamID))
		}
	}
	// PRIORITY, PRIORITY_UPDATE and unknown frame types are ignored.
	return nil
}

func (c *conn) stream(id uint32) *stream {
	c.mu.Lock()
	st := c.streams[id]
	c.mu.Unlock()
	return st
}

func (c *conn) removeStream(st *stream) {
	c.mu.Lock()
	if c.streams[st.id] == st {
		delete(c.streams, st.id)
		c.broadcastLocked()
	}
	c.mu.Unlock()
}

// resetStream sends RST_STREAM and ends the stream locally with err.
func (c *conn) resetStream(id uint32, code http2.ErrCode, err error) {
	c.sendRST(id, code)
	if st := c.stream(id); st != nil {
		c.removeStream(st)
		st.terminate(err, true)
	}
}

// sendRST queues RST_STREAM for id and remembers that we reset it.
func (c *conn) sendRST(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	c.noteResetLocked(id)
	c.mu.Unlock()
	c.queueCtl(func(fr *http2.Framer) { fr.WriteRSTStream(id, code) })
}

// noteResetLocked remembers that we reset stream id (or are about to).
// c.mu held.
func (c *conn) noteResetLocked(id uint32) {
	c.resets[c.resetNext] = id
	c.resetNext = (c.resetNext + 1) % resetMemory
}

// wasReset reports whether we reset stream id recently.
func (c *conn) wasReset(id uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range c.resets {
		if r == id {
			return true
		}
	}
	return false
}

func (c *conn) applySettings(f *http2.SettingsFrame) error {
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			c.mu.Lock()
			defer c.mu.Unlock()
			delta := int64(s.Val) - c.peerInitWindow
			c.peerInitWindow = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
				if st.sendWindow > math.MaxInt32 {
					return connError{http2.ErrCodeFlowControl, "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window"}
				}
			}
			c.broadcastLocked()
		case http2.SettingMaxFrameSize:
			c.peerMaxFrm.Store(s.Val)
		case http2.SettingMaxConcurrentStreams:
			c.mu.Lock()
			c.peerMaxStreams = s.Val
			c.broadcastLocked()
			c.mu.Unlock()
		case http2.SettingHeaderTableSize:
			c.tableMu.Lock()
			if !c.tablePending.Load() || s.Val < c.tableMin {
				c.tableMin = s.Val
			}
			c.tableLast = s.Val
			c.tablePending.Store(true)
			c.tableMu.Unlock()
		}
		return nil
	})
	if err != nil {
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			return connError{http2.ErrCode(ce), "invalid SETTINGS value"}
		}
		return err
	}
	c.queueCtl(func(fr *http2.Framer) { fr.WriteSettingsAck() })
	return nil
}

func (c *conn) windowUpdate(id uint32, inc int64) error {
	c.mu.Lock()
	if id == 0 {
		c.sendWindow += inc
		over := c.sendWindow > math.MaxInt32
		c.broadcastLocked()
		c.mu.Unlock()
		if over {
			return connError{http2.ErrCodeFlowControl, "WINDOW_UPDATE overflows the connection window"}
		}
		return nil
	}
	st := c.streams[id]
	if st == nil {
		c.mu.Unlock()
		if c.role.isIdle(id) {
			return protoErr("WINDOW_UPDATE for idle stream %d", id)
		}
		return nil
	}
	st.sendWindow += inc
	over := st.sendWindow > math.MaxInt32
	c.broadcastLocked()
	c.mu.Unlock()
	if over {
		c.resetStream(id, http2.ErrCodeFlowControl, status.Error(codes.Internal, "h2grpc: peer overflowed the stream window"))
	}
	return nil
}

// readData reads a DATA frame's payload straight into the stream's queue.
func (c *conn) readData(fh http2.FrameHeader) error {
	if fh.StreamID == 0 {
		return protoErr("DATA on stream 0")
	}
	length := int64(fh.Length)
	if length > c.connAvail {
		return connError{http2.ErrCodeFlowControl, "DATA beyond the connection window"}
	}
	c.connAvail -= length
	data, pad := int(fh.Length), 0
	if fh.Flags.Has(http2.FlagDataPadded) {
		b, err := c.br.ReadByte()
		if err != nil {
			return err
		}
		pad = int(b)
		data = int(fh.Length) - 1 - pad
		if data < 0 {
			return protoErr("DATA padding longer than the frame")
		}
	}
	end := fh.Flags.Has(http2.FlagDataEndStream)
	st := c.stream(fh.StreamID)
	if st == nil && c.role.isIdle(fh.StreamID) {
		return protoErr("DATA for idle stream %d", fh.StreamID)
	}
	var rstCode http2.ErrCode
	accept := false
	if st == nil && !c.wasReset(fh.StreamID) {
		// Closed, and not by our RST_STREAM: the peer ended it (END_STREAM
		// or RST_STREAM) and must not send on it any more.
		rstCode = http2.ErrCodeStreamClosed
	}
	if st != nil {
		st.mu.Lock()
		switch {
		case st.recvDone:
			if st.recvHalfClosed {
				rstCode = http2.ErrCodeStreamClosed
			}
		case length > st.recvAvail:
			rstCode = http2.ErrCodeFlowControl
		case !st.dataAllowed:
			rstCode = http2.ErrCodeProtocol
		case st.wantLen >= 0 && (st.gotLen+int64(data) > st.wantLen || end && st.gotLen+int64(data) != st.wantLen):
			// RFC 9113 §8.1.1: a body that disagrees with content-length
			// is malformed.
			rstCode = http2.ErrCodeProtocol
		default:
			st.gotLen += int64(data)
			accept = true
			st.recvAvail -= length
			st.unacked += length - int64(data) // padding returns at once
		}
		st.mu.Unlock()
	}
	if accept && data >= viewMin {
		v, err := c.br.view(data)
		if err != nil {
			return err
		}
		st.mu.Lock()
		st.q.pushView(v)
		st.mu.Unlock()
	} else if accept {
		if err := st.q.fillFrom(c.br, data, &st.mu, c.scratch); err != nil {
			return err
		}
	}
	if accept {
		st.mu.Lock()
		if end && !st.recvDone {
			st.recvDone, st.recvHalfClosed, st.recvErr = true, true, c.role.dataEnded()
		}
		st.mu.Unlock()
		st.signal()
		if end {
			st.recvClosed()
		}
	} else if err := c.br.Discard(data); err != nil {
		return err
	}
	if err := c.br.Discard(pad); err != nil {
		return err
	}
	if rstCode != 0 {
		c.resetStream(fh.StreamID, rstCode, status.Errorf(codes.Internal, "h2grpc: stream %d: %v", fh.StreamID, rstCode))
	}
	c.connUnacked += length
	if c.connUnacked >= c.connWindow/4 {
		inc := c.connUnacked
		c.connUnacked = 0
		c.connAvail += inc
		c.queueCtl(func(fr *http2.Framer) { fr.WriteWindowUpdate(0, uint32(inc)) })
	}
	return nil
}

// ---- keepalive ----

// startKeepalive arms the idle timer when an interval is configured.
func (c *conn) startKeepalive() {
	if c.kaInterval <= 0 {
		return
	}
	c.kaMu.Lock()
	c.kaTimer = time.AfterFunc(c.kaInterval, c.keepaliveTick)
	c.kaMu.Unlock()
}

func (c *conn) keepaliveTick() {
	c.kaMu.Lock()
	select {
	case <-c.done:
		c.kaMu.Unlock()
		return
	default:
	}
	now := int64(time.Since(c.start))
	last := c.lastRead.Load()
	if c.pingOut {
		// Anything read since the PING proves the peer alive, as in grpc-go.
		if last <= c.pingSentAt {
			c.kaMu.Unlock()
			c.close(fmt.Errorf("keepalive: no PING ACK within %v", c.kaTimeout))
			return
		}
		c.pingOut = false
	}
	idle := time.Duration(now - last)
	if idle < c.kaInterval {
		c.kaTimer.Reset(c.kaInterval - idle)
		c.kaMu.Unlock()
		return
	}
	c.pingOut = true
	c.pingSentAt = now
	c.pingData[0]++
	data := c.pingData
	c.kaTimer.Reset(c.kaTimeout)
	c.kaMu.Unlock()
	c.queueCtl(func(fr *http2.Framer) { fr.WritePing(false, data) })
}

func (c *conn) pingAcked(data [8]byte) {
	c.kaMu.Lock()
	if c.pingOut && data == c.pingData {
		c.pingOut = false
	}
	c.kaMu.Unlock()
}
