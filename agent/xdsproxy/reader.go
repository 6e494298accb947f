package xdsproxy

import (
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

// reader walks the top level of a protobuf message held in a
// mem.BufferSlice (grpc's receive buffers, 16 KiB each) without flattening
// it. Values that straddle two buffers are copied into a scratch slice;
// everything else is read in place. It accepts exactly what protowire's
// Consume* functions accept.
type reader struct {
	bufs mem.BufferSlice
	next int    // index of the buffer after cur
	cur  []byte // unread part of the current buffer
	off  int    // offset in the message of cur[0]
	end  int    // message length
}

func newReader(bufs mem.BufferSlice) reader {
	return reader{bufs: bufs, end: bufs.Len()}
}

func (r *reader) remaining() int { return r.end - r.off }

// fill makes cur non-empty unless the message is exhausted.
func (r *reader) fill() {
	for len(r.cur) == 0 && r.next < len(r.bufs) {
		r.cur = r.bufs[r.next].ReadOnlyData()
		r.next++
	}
}

// varint reads a varint with protowire.ConsumeVarint's rules.
func (r *reader) varint() (uint64, error) {
	r.fill()
	if len(r.cur) >= protowire.SizeVarint(1<<63) || len(r.cur) == r.remaining() {
		v, n := protowire.ConsumeVarint(r.cur)
		if n < 0 {
			return 0, errMalformed
		}
		r.cur, r.off = r.cur[n:], r.off+n
		return v, nil
	}
	// Near a buffer boundary: gather up to 10 bytes.
	var tmp [10]byte
	save := *r
	k, _ := r.read(tmp[:min(len(tmp), r.remaining())])
	v, n := protowire.ConsumeVarint(tmp[:k])
	if n < 0 {
		return 0, errMalformed
	}
	*r = save
	_ = r.skip(n)
	return v, nil
}

// read copies len(p) bytes (or what is left) into p.
func (r *reader) read(p []byte) (int, error) {
	k := 0
	for k < len(p) {
		r.fill()
		if len(r.cur) == 0 {
			return k, errMalformed
		}
		c := copy(p[k:], r.cur)
		r.cur, r.off, k = r.cur[c:], r.off+c, k+c
	}
	return k, nil
}

func (r *reader) tag() (protowire.Number, protowire.Type, error) {
	v, err := r.varint()
	if err != nil {
		return 0, 0, err
	}
	num, typ := protowire.DecodeTag(v)
	if num < protowire.MinValidNumber {
		return 0, 0, errMalformed
	}
	return num, typ, nil
}

// length reads the length of a length-delimited field and checks that the
// value fits in what is left.
func (r *reader) length() (int, error) {
	v, err := r.varint()
	if err != nil {
		return 0, err
	}
	if v > uint64(r.remaining()) {
		return 0, errMalformed
	}
	return int(v), nil
}

func (r *reader) skip(n int) error {
	if n > r.remaining() {
		return errMalformed
	}
	for n > 0 {
		r.fill()
		c := min(n, len(r.cur))
		r.cur, r.off, n = r.cur[c:], r.off+c, n-c
	}
	return nil
}

// bytes returns the next n bytes: in place when they lie in one buffer,
// else copied into scratch (grown as needed and returned for reuse).
func (r *reader) bytes(n int, scratch []byte) (v, newScratch []byte, err error) {
	if n > r.remaining() {
		return nil, scratch, errMalformed
	}
	r.fill()
	if n <= len(r.cur) {
		v = r.cur[:n]
		r.cur, r.off = r.cur[n:], r.off+n
		return v, scratch, nil
	}
	if cap(scratch) < n {
		scratch = make([]byte, n)
	}
	v = scratch[:n]
	_, err = r.read(v)
	return v, scratch, err
}

// skipValue skips the value of a field whose tag was just read, groups
// included.
func (r *reader) skipValue(num protowire.Number, typ protowire.Type) error {
	return r.skipValueDepth(num, typ, protowire.DefaultRecursionLimit)
}

func (r *reader) skipValueDepth(num protowire.Number, typ protowire.Type, depth int) error {
	switch typ {
	case protowire.VarintType:
		_, err := r.varint()
		return err
	case protowire.Fixed32Type:
		return r.skip(4)
	case protowire.Fixed64Type:
		return r.skip(8)
	case protowire.BytesType:
		n, err := r.length()
		if err != nil {
			return err
		}
		return r.skip(n)
	case protowire.StartGroupType:
		if depth < 0 {
			return errMalformed
		}
		for {
			if r.remaining() == 0 {
				return errMalformed
			}
			n, t, err := r.tag()
			if err != nil {
				return err
			}
			if t == protowire.EndGroupType {
				if n != num {
					return errMalformed
				}
				return nil
			}
			if err := r.skipValueDepth(n, t, depth-1); err != nil {
				return err
			}
		}
	}
	return errMalformed
}
