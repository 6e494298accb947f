package h2grpc

import (
	"io"
	"sync"

	"google.golang.org/grpc/mem"
)

// chunkSize is the size of a receive chunk for payloads that are copied:
// one DATA frame at the default SETTINGS_MAX_FRAME_SIZE we advertise (we do
// not raise it).
const chunkSize = 16384

// chunk holds received bytes b[r:w].
type chunk struct {
	b    []byte
	r, w int
}

func newChunkPool() *sync.Pool {
	return &sync.Pool{New: func() any { return &chunk{b: make([]byte, chunkSize)} }}
}

// qitem is one piece of a recvQueue: a view of a connection slab (large
// payloads, never copied) or a chunk the queue owns (small payloads, copied).
type qitem struct {
	v mem.Buffer
	c *chunk
}

// recvQueue is a stream's received, not yet read, body bytes. A large
// payload is queued as a view of the connection's read buffer; small ones
// are copied into the free tail of the last chunk (or a fresh one), so the
// memory held stays bounded by a small multiple of the bytes buffered (a
// flood of one-byte frames cannot pin a buffer each).
//
// The reader goroutine owns a chunk until it pushes it; after that every
// access is under the stream's lock.
type recvQueue struct {
	items []qitem
	n     int // bytes buffered
	pool  *sync.Pool
}

// tailFree is how many bytes fit after the last chunk's data.
func (q *recvQueue) tailFree() int {
	if len(q.items) == 0 {
		return 0
	}
	t := q.items[len(q.items)-1].c
	if t == nil {
		return 0
	}
	return len(t.b) - t.w
}

// appendTail copies p into the last chunk's free space; p must fit.
func (q *recvQueue) appendTail(p []byte) {
	t := q.items[len(q.items)-1].c
	t.w += copy(t.b[t.w:], p)
	q.n += len(p)
}

func (q *recvQueue) push(c *chunk) {
	q.items = append(q.items, qitem{c: c})
	q.n += c.w - c.r
}

// pushView queues a view, taking over the caller's reference.
func (q *recvQueue) pushView(v mem.Buffer) {
	q.items = append(q.items, qitem{v: v})
	q.n += v.Len()
}

// pop drops the first item (already drained or handed over).
func (q *recvQueue) pop() {
	q.items[0] = qitem{}
	q.items = q.items[1:]
}

// read copies buffered bytes into p, releasing drained pieces (the tail
// chunk is kept and rewound for reuse).
func (q *recvQueue) read(p []byte) int {
	n := 0
	for n < len(p) && len(q.items) > 0 {
		it := &q.items[0]
		if it.v != nil {
			k, rest := mem.ReadUnsafe(p[n:], it.v)
			n += k
			if rest != nil {
				it.v = rest
				break
			}
			q.pop()
			continue
		}
		c := it.c
		k := copy(p[n:], c.b[c.r:c.w])
		c.r += k
		n += k
		if c.r < c.w {
			break
		}
		if len(q.items) == 1 {
			c.r, c.w = 0, 0
			break
		}
		q.pop()
		q.pool.Put(c)
	}
	q.n -= n
	return n
}

// release frees every piece; the queue is empty afterwards.
func (q *recvQueue) release() {
	for _, it := range q.items {
		if it.v != nil {
			it.v.Free()
			continue
		}
		it.c.r, it.c.w = 0, 0
		q.pool.Put(it.c)
	}
	q.items = nil
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
// be empty) and returns them: a view as it is (split if longer than max),
// the first chunk's own memory when it goes whole and nothing can be
// appended to it any more (the chunk then belongs to the caller and is
// never pooled again), else a copy.
func (q *recvQueue) take(max int) mem.Buffer {
	it := &q.items[0]
	if it.v != nil {
		v := it.v
		if v.Len() > max {
			v, it.v = mem.SplitUnsafe(v, max)
		} else {
			q.pop()
		}
		q.n -= v.Len()
		return v
	}
	c := it.c
	avail := c.w - c.r
	if avail > max || (len(q.items) == 1 && c.w < len(c.b)) {
		out := make([]byte, min(avail, max))
		q.read(out)
		return mem.SliceBuffer(out)
	}
	out := c.b[c.r:c.w:c.w]
	q.pop()
	q.n -= len(out)
	return mem.SliceBuffer(out)
}

// takeAll appends buffered pieces to dst until max bytes (at least one
// piece; the queue must not be empty).
func (q *recvQueue) takeAll(dst mem.BufferSlice, max int) (mem.BufferSlice, int) {
	got := 0
	for got < max && q.n > 0 {
		b := q.take(max - got)
		dst = append(dst, b)
		got += b.Len()
	}
	return dst, got
}
