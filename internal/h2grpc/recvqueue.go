package h2grpc

import (
	"io"
	"sync"
)

// chunkSize is the size of a receive chunk: one DATA frame at the default
// SETTINGS_MAX_FRAME_SIZE we advertise (we do not raise it).
const chunkSize = 16384

// chunk holds received bytes b[r:w].
type chunk struct {
	b    []byte
	r, w int
}

func newChunkPool() *sync.Pool {
	return &sync.Pool{New: func() any { return &chunk{b: make([]byte, chunkSize)} }}
}

// recvQueue is a stream's received, not yet read, body bytes. A frame's payload
// is read from the connection straight into a fresh chunk when it does not fit
// the free tail of the last one; small frames are copied into that tail, so
// the memory held stays within about twice the bytes buffered (a flood of
// one-byte frames cannot pin a chunk each).
//
// The reader goroutine owns a chunk until it pushes it; after that every
// access is under the stream's lock.
type recvQueue struct {
	chunks []*chunk
	n      int // bytes buffered
	pool   *sync.Pool
}

// tailFree is how many bytes fit after the last chunk's data.
func (q *recvQueue) tailFree() int {
	if len(q.chunks) == 0 {
		return 0
	}
	t := q.chunks[len(q.chunks)-1]
	return len(t.b) - t.w
}

// appendTail copies p into the last chunk's free space; p must fit.
func (q *recvQueue) appendTail(p []byte) {
	t := q.chunks[len(q.chunks)-1]
	t.w += copy(t.b[t.w:], p)
	q.n += len(p)
}

func (q *recvQueue) push(c *chunk) {
	q.chunks = append(q.chunks, c)
	q.n += c.w - c.r
}

// read copies buffered bytes into p, releasing drained chunks (the tail is
// kept and rewound for reuse).
func (q *recvQueue) read(p []byte) int {
	n := 0
	for n < len(p) && len(q.chunks) > 0 {
		c := q.chunks[0]
		k := copy(p[n:], c.b[c.r:c.w])
		c.r += k
		n += k
		if c.r < c.w {
			break
		}
		if len(q.chunks) == 1 {
			c.r, c.w = 0, 0
			break
		}
		q.chunks[0] = nil
		q.chunks = q.chunks[1:]
		q.pool.Put(c)
	}
	q.n -= n
	return n
}

// release returns every chunk to the pool; the queue is empty afterwards.
func (q *recvQueue) release() {
	for i, c := range q.chunks {
		c.r, c.w = 0, 0
		q.pool.Put(c)
		q.chunks[i] = nil
	}
	q.chunks = nil
	q.n = 0
}

// fillFrom reads n payload bytes from r into q, holding mu only to publish.
func (q *recvQueue) fillFrom(r io.Reader, n int, mu *sync.Mutex, scratch []byte) error {
	for n > 0 {
		mu.Lock()
		free := q.tailFree()
		mu.Unlock()
		if n <= free {
			if _, err := io.ReadFull(r, scratch[:n]); err != nil {
				return err
			}
			mu.Lock()
			// The tail may have been drained and rewound meanwhile (more
			// room) or the queue released by a reset (no tail at all).
			if q.tailFree() >= n {
				q.appendTail(scratch[:n])
			} else {
				c := q.pool.Get().(*chunk)
				c.r, c.w = 0, copy(c.b, scratch[:n])
				q.push(c)
			}
			mu.Unlock()
			return nil
		}
		c := q.pool.Get().(*chunk)
		c.r = 0
		c.w = min(n, len(c.b))
		if _, err := io.ReadFull(r, c.b[:c.w]); err != nil {
			c.w = 0
			q.pool.Put(c)
			return err
		}
		n -= c.w
		mu.Lock()
		q.push(c)
		mu.Unlock()
	}
	return nil
}

// take removes up to max bytes from the front of the queue (which must not
// be empty) and returns them: the first chunk's own memory when it goes
// whole and nothing can be appended to it any more (the chunk then belongs
// to the caller and is never pooled again), else a copy.
func (q *recvQueue) take(max int) []byte {
	c := q.chunks[0]
	avail := c.w - c.r
	if avail > max || (len(q.chunks) == 1 && c.w < len(c.b)) {
		out := make([]byte, min(avail, max))
		q.read(out)
		return out
	}
	out := c.b[c.r:c.w:c.w]
	q.chunks[0] = nil
	q.chunks = q.chunks[1:]
	q.n -= len(out)
	return out
}
