package xdsproxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Cut-through forwarding.
//
// A large response (a 3000-service CDS push is 7 MB) is not received whole
// before it is sent on: once the first bytes tell its type, the frame is
// queued for Envoy and its writer sends the bytes as they arrive, while the
// upstream reader keeps appending. Only the last chunk is held back until
// the whole message is parsed, so the envelope (nonce, version, resources)
// is known before Envoy can answer it.

const (
	// cutThroughMin is the message size from which responses are forwarded
	// while they arrive. Smaller ones are received whole: they cost less
	// than the bookkeeping.
	cutThroughMin = 64 << 10
	// chunkSize is the most one read from the upstream stream takes.
	chunkSize = 32 << 10
	// sniffMax is how much of a message the type must be read from.
	sniffMax = 4 << 10
)

var (
	// errFrameAborted: the frame's upstream stream failed before the
	// writer sent any of it; the writer skips it.
	errFrameAborted = errors.New("response aborted before it was sent")
	bufPool         = mem.DefaultBufferPool()
)

// growth is the state of a frame that is still arriving.
type growth struct {
	mu   sync.Mutex
	cond *sync.Cond
	have int  // bytes appended so far
	pub  int  // buffers of frame.data the writer may send
	done bool // the whole message is published and its envelope set
	err  error
	// fill reads the rest of the message; finalize is called with the
	// parsed envelope before the last chunk is published.
	fill func(finalize func(env *frame)) error
	// failed, when set, learns why fill failed before the frame is
	// aborted (and Envoy's stream, if it got part of it, fails).
	failed func(error)
}

// growing reports whether f is (or was) forwarded while arriving.
func (f *frame) growing() bool { return f.g != nil }

// next waits until buffers beyond the first sent are published and
// returns them; done reports that they complete the message.
func (f *frame) next(sent int) (bufs mem.BufferSlice, done bool, err error) {
	g := f.g
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.pub <= sent && !g.done && g.err == nil {
		g.cond.Wait()
	}
	if g.err != nil {
		if sent == 0 {
			return nil, false, errFrameAborted
		}
		return nil, false, g.err
	}
	return f.data[sent:g.pub], g.done, nil
}

// appendChunks adds received buffers; they are published at once, but the
// last one is held back if it completes the message. It returns the bytes
// appended so far.
func (f *frame) appendChunks(bufs mem.BufferSlice) (have int) {
	g := f.g
	g.mu.Lock()
	for _, b := range bufs {
		f.starts = append(f.starts, g.have)
		f.data = append(f.data, b)
		g.have += b.Len()
	}
	have = g.have
	pub := len(f.data)
	if have == f.size {
		pub--
	}
	if pub > g.pub {
		g.pub = pub
		g.cond.Broadcast()
	}
	g.mu.Unlock()
	return have
}

// finish publishes the rest of the message.
func (f *frame) finish() {
	g := f.g
	g.mu.Lock()
	g.pub, g.done = len(f.data), true
	g.cond.Broadcast()
	g.mu.Unlock()
}

// abort ends a growing frame with err: a writer that has sent part of it
// fails its stream, one that has not skips it.
func (f *frame) abort(err error) {
	g := f.g
	g.mu.Lock()
	if !g.done && g.err == nil {
		g.err = err
	}
	g.cond.Broadcast()
	g.mu.Unlock()
}

// readMessageHeader reads a gRPC message prefix and returns the length.
func readMessageHeader(r io.Reader, max int) (int, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, status.Error(codes.Internal, "stream ended inside a message header")
		}
		return 0, err
	}
	if hdr[0] != 0 {
		return 0, status.Error(codes.Internal, "compressed message, but no compression was negotiated")
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if n > max {
		return 0, status.Errorf(codes.ResourceExhausted, "message of %d bytes is larger than the %d allowed", n, max)
	}
	return n, nil
}

// readChunks appends to dst at most n bytes (as many as are there, at
// least one) in pooled buffers.
func readChunks(r io.Reader, dst mem.BufferSlice, n int) (mem.BufferSlice, error) {
	var err error
	k := len(dst)
	if cr, ok := r.(chunkReader); ok {
		dst, err = cr.ReadBuffers(dst, n)
	} else {
		buf := bufPool.Get(min(n, chunkSize))
		var m int
		if m, err = r.Read(*buf); m > 0 {
			*buf = (*buf)[:m]
			dst = append(dst, mem.NewBuffer(buf, bufPool))
		} else {
			bufPool.Put(buf)
		}
	}
	if len(dst) > k {
		return dst, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = status.Error(codes.Internal, "stream ended inside a message")
	}
	return dst, err
}

// chunkReader hands over received buffers without a copy (h2grpc).
type chunkReader interface {
	ReadBuffers(dst mem.BufferSlice, max int) (mem.BufferSlice, error)
}

// readAheader lets the sender send a whole message at once (h2grpc).
type readAheader interface{ ReadAhead(n int) }

// readWhole reads an n-byte message body into pooled buffers.
func readWhole(r io.Reader, n int) (mem.BufferSlice, error) {
	var bufs mem.BufferSlice
	for have := 0; have < n; {
		k := len(bufs)
		var err error
		if bufs, err = readChunks(r, bufs, n-have); err != nil {
			bufs.Free()
			return nil, err
		}
		have += bufs[k:].Len()
	}
	return bufs, nil
}

// recvFrame reads the next discovery response from a gRPC byte stream. A
// large response of a type Envoy takes comes back growing: the caller
// queues it for Envoy, then calls f.g.fill to read the rest.
func recvFrame(r io.Reader, delta bool) (*frame, error) {
	n, err := readMessageHeader(r, maxMsgSize)
	if err != nil {
		return nil, err
	}
	if ra, ok := r.(readAheader); ok {
		// The whole message is held (to forward it, and as the last
		// known good) anyway: let the control plane send all of it
		// without waiting for window updates.
		ra.ReadAhead(n)
	}
	if n < cutThroughMin {
		bufs, err := readWhole(r, n)
		if err != nil {
			return nil, err
		}
		return newFrame(delta, bufs)
	}
	f := &frame{delta: delta, size: n, g: &growth{}}
	f.g.cond = sync.NewCond(&f.g.mu)
	f.refs.Store(1)
	var prefix []byte
	var batch mem.BufferSlice
	for f.g.have < n && len(prefix) < sniffMax {
		batch, err = readChunks(r, batch[:0], n-f.g.have)
		if err != nil {
			f.data.Free()
			return nil, err
		}
		f.appendChunks(batch)
		for _, b := range batch {
			if len(prefix) < sniffMax {
				prefix = append(prefix, b.ReadOnlyData()[:min(b.Len(), sniffMax-len(prefix))]...)
			}
		}
		t, ok := sniffType(prefix, delta)
		if !ok {
			continue
		}
		if !forwardable(t) || f.g.have == n {
			break // intercepted, or already whole: the plain path
		}
		f.typeURL = t
		f.g.fill = func(finalize func(env *frame)) error { return fillFrame(r, f, finalize) }
		return f, nil
	}
	// Received whole: the type is not Envoy's, or not found early.
	for f.g.have < n {
		batch, err = readChunks(r, batch[:0], n-f.g.have)
		if err != nil {
			f.data.Free()
			return nil, err
		}
		f.appendChunks(batch)
	}
	data := f.data
	return newFrame(delta, data)
}

// fillFrame reads the rest of a growing frame. On error the frame is
// aborted.
//
// The envelope is read as the bytes arrive (incParser): between reads, the
// fields that arrived whole are read, so once the last chunk is in (and
// held back) only the fields it completes are left to read before Envoy
// gets it.
func fillFrame(r io.Reader, f *frame, finalize func(env *frame)) error {
	// This goroutine is the only one that appends to f.data and f.starts
	// and sets f.g.have: it reads them without the lock.
	p := newIncParser(f.delta)
	err := func() error {
		var batch mem.BufferSlice
		for have := f.g.have; have < f.size; {
			p.advance(f.data, have)
			var err error
			if batch, err = readChunks(r, batch[:0], f.size-have); err != nil {
				return err
			}
			have = f.appendChunks(batch)
		}
		return nil
	}()
	if err == nil {
		// The envelope is a separate frame: f's fields are read by others
		// once queued.
		var env *frame
		if env, err = p.finish(f.data, f.size, f.starts); err == nil && env.typeURL != f.typeURL {
			err = fmt.Errorf("response type %s does not match its resources (%s)", env.typeURL, f.typeURL)
		}
		if err == nil {
			finalize(env)
			f.finish()
			return nil
		}
		err = status.Errorf(codes.Internal, "response from the control plane: %v", err)
	}
	if f.g.failed != nil {
		f.g.failed(err)
	}
	f.abort(err)
	return err
}

// setEnvelope copies what parse found (the caller serialises with the
// frame's readers).
func (f *frame) setEnvelope(env *frame) {
	f.version, f.nonce, f.resources, f.removed = env.version, env.nonce, env.resources, env.removed
}

// sniffType finds a response's type from its first bytes: the type_url
// field if it comes first, else the type of the first resource (an Any, or
// for Delta the Any inside the first Resource).
func sniffType(b []byte, delta bool) (string, bool) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", false
		}
		b = b[n:]
		if typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return "", false
			}
			b = b[n:]
			continue
		}
		l, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return "", false
		}
		b = b[n:]
		switch num {
		case sotwTypeURL: // the same number for both kinds
			if uint64(len(b)) < l {
				return "", false
			}
			return string(b[:l]), true
		case sotwResource:
			v := b[:min(uint64(len(b)), l)]
			if delta {
				if v = prefixField(v, resAny); v == nil {
					return "", false
				}
			}
			if t := prefixField(v, 1); len(t) > 0 {
				return string(t), true
			}
			return "", false
		}
		if uint64(len(b)) < l {
			return "", false
		}
		b = b[l:]
	}
	return "", false
}

// prefixField returns the value of the first length-delimited field want in
// a possibly truncated message, itself possibly truncated for an embedded
// message but complete for a string that is wholly present; nil if it is not
// in b.
func prefixField(b []byte, want protowire.Number) []byte {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil
		}
		b = b[n:]
		if typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return nil
			}
			b = b[n:]
			continue
		}
		l, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return nil
		}
		b = b[n:]
		if num == want {
			if want == 1 && uint64(len(b)) < l {
				return nil // a type URL cut short
			}
			return b[:min(uint64(len(b)), l)]
		}
		if uint64(len(b)) < l {
			return nil
		}
		b = b[l:]
	}
	return nil
}

// writeMessage writes a request as a gRPC message.
func writeMessage(w io.Writer, m proto.Message, scratch []byte) ([]byte, error) {
	b := append(scratch[:0], 0, 0, 0, 0, 0)
	b, err := proto.MarshalOptions{}.MarshalAppend(b, m)
	if err != nil {
		return scratch, err
	}
	binary.BigEndian.PutUint32(b[1:5], uint32(len(b)-5))
	_, err = w.Write(b)
	return b, err
}

// readMessage reads one gRPC message into m.
func readMessage(r io.Reader, m proto.Message, scratch []byte) ([]byte, error) {
	n, err := readMessageHeader(r, maxMsgSize)
	if err != nil {
		return scratch, err
	}
	if cap(scratch) < n {
		scratch = make([]byte, n)
	}
	b := scratch[:n]
	if _, err := io.ReadFull(r, b); err != nil {
		return scratch, status.Errorf(codes.Internal, "stream ended inside a message: %v", err)
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return scratch, status.Errorf(codes.Internal, "decode %T: %v", m, err)
	}
	return scratch, nil
}

// flusher is a buffered byte stream.
type flusher interface {
	io.Writer
	Flush() error
}

// vecWriter writes and flushes several byte slices at once, without copying
// them where it can (h2grpc.ServerStream).
type vecWriter interface {
	WriteBuffers(bufs [][]byte) error
}

// writeBufs writes bufs and flushes.
func writeBufs(w flusher, bufs [][]byte) error {
	if vw, ok := w.(vecWriter); ok {
		return vw.WriteBuffers(bufs)
	}
	for _, b := range bufs {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return w.Flush()
}

// writeFrame writes f as a gRPC message, following a growing frame as it
// arrives: each batch that arrived while the previous one was written goes
// out in one write.
func writeFrame(w flusher, f *frame) error {
	if f.growing() {
		// Skip a frame that failed before any of it was sent.
		f.g.mu.Lock()
		aborted := f.g.err != nil
		f.g.mu.Unlock()
		if aborted {
			return errFrameAborted
		}
	}
	var hdr [5]byte
	binary.BigEndian.PutUint32(hdr[1:], uint32(f.size))
	vec := append(make([][]byte, 0, 64), hdr[:])
	if !f.growing() {
		for _, b := range f.data {
			vec = append(vec, b.ReadOnlyData())
		}
		return writeBufs(w, vec)
	}
	for sent := 0; ; {
		bufs, done, err := f.next(sent)
		if errors.Is(err, errFrameAborted) {
			err = errors.New("the control plane's stream failed inside a response already being forwarded")
		}
		if err != nil {
			return err
		}
		for _, b := range bufs {
			vec = append(vec, b.ReadOnlyData())
		}
		sent += len(bufs)
		if err := writeBufs(w, vec); err != nil {
			return err
		}
		vec = vec[:0]
		if done {
			return nil
		}
	}
}
