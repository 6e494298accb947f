package h2grpc

import (
	"math"
	"sync"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/mem"
)

// stream is the state both roles keep for one HTTP/2 stream.
type stream struct {
	id uint32
	c  *conn

	// Send side, under c.mu.
	sendWindow int64
	sendErr    error // set once the stream can send no more
	sendClosed bool  // END_STREAM sent

	// Receive side, under mu.
	mu             sync.Mutex
	q              recvQueue
	recvAvail      int64 // bytes the peer may still send on this stream
	unacked        int64 // bytes read (or padding) not yet returned to the peer
	dataAllowed    bool  // DATA is legal now (client: after response headers)
	recvDone       bool  // no more DATA is accepted
	recvHalfClosed bool  // recvDone because the peer sent END_STREAM
	recvErr        error // what Read returns once the queue is drained
	wantLen        int64 // the peer's content-length, -1 = none
	gotLen         int64 // body bytes received
	ended          bool
	ready          chan struct{}

	// Role hooks, fixed before the stream is published.
	onEnd        func(err error) // once, when the stream terminates
	onRecvClosed func()          // when DATA with END_STREAM arrives
}

func (c *conn) newStream(id uint32) *stream {
	return &stream{
		id:        id,
		c:         c,
		q:         recvQueue{pool: c.pool},
		recvAvail: c.recvWindow,
		wantLen:   -1,
		ready:     make(chan struct{}, 1),
	}
}

// signal wakes a Read waiting for data or the end of the stream.
func (st *stream) signal() {
	select {
	case st.ready <- struct{}{}:
	default:
	}
}

func (st *stream) recvClosed() {
	if st.onRecvClosed != nil {
		st.onRecvClosed()
	}
}

// terminate ends the stream with err: writes fail with it, and Read returns
// it once the queue is drained (abort drops the queue so it returns at once).
// The caller removes the stream from the connection's table.
func (st *stream) terminate(err error, abort bool) {
	c := st.c
	c.mu.Lock()
	if st.sendErr == nil {
		st.sendErr = err
	}
	c.broadcastLocked()
	c.mu.Unlock()

	st.mu.Lock()
	if !st.recvDone {
		st.recvDone = true
		st.recvErr = err
		if abort {
			st.q.release()
		}
	}
	first := !st.ended
	st.ended = true
	st.mu.Unlock()
	st.signal()
	if first && st.onEnd != nil {
		st.onEnd(err)
	}
}

// read hands out received bytes, returning them to the peer's windows in
// batches of a quarter window.
func (st *stream) read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, _, err := st.readWith(func() int { return st.q.read(p) })
	return n, err
}

// readBuffers appends to dst up to max bytes (at least one) of what has
// arrived, without a copy where it can: see recvQueue.take.
func (st *stream) readBuffers(dst mem.BufferSlice, max int) (mem.BufferSlice, error) {
	if max <= 0 {
		return dst, nil
	}
	_, _, err := st.readWith(func() (n int) { dst, n = st.q.takeAll(dst, max); return n })
	return dst, err
}

// readAhead raises the peer's credit on the stream so that it may send n
// bytes beyond those already queued.
func (st *stream) readAhead(n int64) {
	st.mu.Lock()
	q := int64(st.q.n)
	inc := min(n-q, math.MaxInt32-q) - st.recvAvail
	if st.recvDone || inc <= 0 {
		st.mu.Unlock()
		return
	}
	st.recvAvail += inc
	st.mu.Unlock()
	id := st.id
	st.c.queueCtl(func(fr *http2.Framer) { fr.WriteWindowUpdate(id, uint32(inc)) })
}

// readWith waits for buffered bytes, consumes them with take (under the
// stream's lock) and returns the window credit.
func (st *stream) readWith(take func() int) (int, bool, error) {
	for {
		st.mu.Lock()
		if st.q.n > 0 {
			n := take()
			var inc int64
			if !st.recvDone {
				st.unacked += int64(n)
				if st.unacked >= st.c.recvWindow/4 {
					// Credit beyond a window (left from readAhead) is
					// not renewed.
					inc = max(0, min(st.unacked, st.c.recvWindow-st.recvAvail))
					st.unacked = 0
					st.recvAvail += inc
				}
			}
			st.mu.Unlock()
			if inc > 0 {
				id := st.id
				st.c.queueCtl(func(fr *http2.Framer) { fr.WriteWindowUpdate(id, uint32(inc)) })
			}
			return n, true, nil
		}
		if st.recvDone {
			err := st.recvErr
			st.q.release()
			st.mu.Unlock()
			return 0, false, err
		}
		st.mu.Unlock()
		<-st.ready
	}
}

// reserve waits until the stream and connection windows allow sending and
// takes up to want bytes of both.
func (st *stream) reserve(want int) (int, error) {
	c := st.c
	c.mu.Lock()
	for {
		if st.sendErr != nil {
			err := st.sendErr
			c.mu.Unlock()
			return 0, err
		}
		n := int64(min(want, maxReservation))
		n = min(n, st.sendWindow, c.sendWindow)
		if n > 0 {
			st.sendWindow -= n
			c.sendWindow -= n
			c.mu.Unlock()
			return int(n), nil
		}
		wake := c.wake
		c.mu.Unlock()
		// The peer returns credit only for what it has received.
		if err := c.flush(); err != nil {
			return 0, err
		}
		<-wake
		c.mu.Lock()
	}
}

// tryReserve takes up to want bytes of both windows without waiting.
func (st *stream) tryReserve(want int) int {
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.sendErr != nil {
		return 0
	}
	n := max(0, min(int64(want), st.sendWindow, c.sendWindow))
	st.sendWindow -= n
	c.sendWindow -= n
	return int(n)
}

// writeBuffers sends bufs as DATA and flushes. On a plain socket the
// payload goes from bufs to the kernel in one writev per window
// reservation (no copy into the write buffer); else it is written as
// write does.
func (st *stream) writeBuffers(bufs [][]byte) error {
	c := st.c
	left := 0
	for _, b := range bufs {
		left += len(b)
	}
	for left > 0 {
		n, err := st.reserve(left)
		if err != nil {
			return err
		}
		for n < left && n < maxVecReservation {
			k := st.tryReserve(min(left, maxVecReservation) - n)
			if k == 0 {
				break
			}
			n += k
		}
		c.wmu.Lock()
		bufs, err = c.writeVecLocked(st.id, bufs, n)
		c.unlockW()
		if err != nil {
			return c.role.lostErr(err)
		}
		left -= n
	}
	return c.flush()
}

// write sends p as DATA, blocking on flow control; buffered until a flush.
func (st *stream) write(p []byte) (int, error) {
	c := st.c
	done := 0
	for len(p) > 0 {
		n, err := st.reserve(len(p))
		if err != nil {
			return done, err
		}
		c.wmu.Lock()
		err = c.writeDataLocked(st.id, p[:n], false)
		c.unlockW()
		if err != nil {
			return done, c.role.lostErr(err)
		}
		done += n
		p = p[n:]
	}
	return done, nil
}
