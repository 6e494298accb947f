package h2grpc

import (
	"io"
	"sync"

	"google.golang.org/grpc/mem"
)

const (
	// slabSize is the size of a connection's read buffers (slabs): one read
	// from the socket takes as much as fits.
	slabSize = 128 << 10
	// viewMin is the DATA payload size from which the payload is handed to
	// its stream as a view of the slab (no copy). Smaller payloads are
	// copied, so a view never pins more than slabSize/viewMin times its own
	// size.
	viewMin = slabSize / 16
	// minRead: a slab with less free room than this is replaced (or
	// rewound) before the next read, so reads stay large.
	minRead = slabSize / 8
)

// slabPool recycles slabs once every view of them is freed
// (mem.BufferPool).
type slabPool struct{ p sync.Pool }

// slabs is the one slab pool of the process, shared by every connection as
// grpc-go shares mem.DefaultBufferPool: connections come and go (a
// reconnection after a control plane outage is a new one), and the slabs
// of one connection's responses, freed when the proxy lets go of them,
// serve the next (fresh slabs cost zeroing and page faults). Like any
// sync.Pool it holds nothing the GC wants back for long.
var slabs = newSlabPool()

func newSlabPool() *slabPool {
	return &slabPool{p: sync.Pool{New: func() any { b := make([]byte, slabSize); return &b }}}
}

func (p *slabPool) Get(int) *[]byte { return p.p.Get().(*[]byte) }

func (p *slabPool) Put(b *[]byte) { p.p.Put(b) }

// slabReader is the connection's buffered reader. Unlike bufio it can hand
// out buffered bytes without copying them (view): the slab is then never
// written again, and returns to the pool when the reader and every view
// have let go of it.
//
// Only the connection's reader goroutine uses it.
type slabReader struct {
	src    io.Reader
	pool   *slabPool
	slab   mem.Buffer // the reader's reference to b; nil before the first read
	b      []byte
	r, w   int
	viewed bool // views of b were handed out: it cannot be rewound
}

func newSlabReader(src io.Reader, pool *slabPool) *slabReader {
	return &slabReader{src: src, pool: pool}
}

// fill reads until at least need bytes are buffered, contiguous in the
// slab. need <= slabSize-minRead.
func (s *slabReader) fill(need int) error {
	for s.w-s.r < need {
		if s.slab == nil || len(s.b)-s.w < minRead || len(s.b)-s.r < need {
			s.newSlab()
		}
		n, err := s.src.Read(s.b[s.w:])
		s.w += n
		if err != nil && s.w-s.r < need {
			return err
		}
	}
	return nil
}

// newSlab makes room after the buffered bytes: it rewinds the slab if no
// view of it is out, else moves the buffered bytes to a fresh slab.
func (s *slabReader) newSlab() {
	if s.slab != nil && !s.viewed {
		s.w = copy(s.b, s.b[s.r:s.w])
		s.r = 0
		return
	}
	nb := s.pool.Get(slabSize)
	w := copy(*nb, s.b[s.r:s.w])
	if s.slab != nil {
		s.slab.Free()
	}
	s.slab = mem.NewBuffer(nb, s.pool)
	s.b, s.r, s.w, s.viewed = *nb, 0, w, false
}

// Read copies buffered bytes into p, reading from the source only when
// nothing is buffered.
func (s *slabReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if s.r == s.w {
		if err := s.fill(1); err != nil {
			return 0, err
		}
	}
	n := copy(p, s.b[s.r:s.w])
	s.r += n
	return n, nil
}

// ReadByte reads one byte.
func (s *slabReader) ReadByte() (byte, error) {
	if err := s.fill(1); err != nil {
		return 0, err
	}
	c := s.b[s.r]
	s.r++
	return c, nil
}

// Discard skips n bytes.
func (s *slabReader) Discard(n int) error {
	for n > 0 {
		if err := s.fill(1); err != nil {
			return err
		}
		k := min(n, s.w-s.r)
		s.r += k
		n -= k
	}
	return nil
}

// view returns the next n bytes (0 < n <= slabSize-minRead) in place; the
// caller owns the view and frees it.
func (s *slabReader) view(n int) (mem.Buffer, error) {
	if err := s.fill(n); err != nil {
		return nil, err
	}
	v := s.slab.Slice(s.r, s.r+n)
	s.r += n
	s.viewed = true
	return v, nil
}
