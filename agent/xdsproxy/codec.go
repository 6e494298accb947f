package xdsproxy

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync/atomic"

	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers the "proto" codec we delegate to
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

// Field numbers of the xDS messages the proxy reads without decoding them
// fully (envoy/service/discovery/v3/discovery.proto). Checked against the
// generated types in codec_test.go.
const (
	sotwVersion  = 1 // DiscoveryResponse.version_info
	sotwResource = 2 // DiscoveryResponse.resources (Any)
	sotwTypeURL  = 4 // DiscoveryResponse.type_url
	sotwNonce    = 5 // DiscoveryResponse.nonce

	deltaVersion  = 1 // DeltaDiscoveryResponse.system_version_info
	deltaResource = 2 // DeltaDiscoveryResponse.resources (Resource)
	deltaTypeURL  = 4 // DeltaDiscoveryResponse.type_url
	deltaNonce    = 5 // DeltaDiscoveryResponse.nonce
	deltaRemoved  = 6 // DeltaDiscoveryResponse.removed_resources

	resVersion = 1 // Resource.version
	resAny     = 2 // Resource.resource
	resName    = 3 // Resource.name

	anyValue = 2 // google.protobuf.Any.value
)

// frame is a discovery response kept as the buffers it arrived in.
//
// The proxy reads only the envelope (type, version, nonce, and for Delta the
// resource names and versions) and forwards the very buffers grpc received
// it in: a 7 MB CDS push is neither decoded into Go structs, nor encoded
// again, nor copied into one contiguous block. The last-known-good cache
// keeps the same buffers.
//
// The buffers are shared, so a frame is reference counted: whoever keeps a
// frame (a response slot, the in-flight list, the cache, a send in
// progress) holds one reference, and the last release hands the buffers
// back to grpc's pool. A frame is created with one reference, owned by its
// creator.
type frame struct {
	delta bool
	data  mem.BufferSlice
	size  int
	// starts[i] is the offset of data[i] in the message, for random access.
	starts []int
	refs   atomic.Int32

	typeURL, version, nonce string
	// resources: for SotW the encoded Any messages (parsed only on demand);
	// for Delta one entry per Resource.
	resources []resourceRef
	removed   []string

	// Set by the proxy, not the wire: the upstream stream generation the
	// frame came from (0 = served from the last-known-good cache).
	gen uint64
	// g is set on a frame forwarded while it arrives (cutthrough.go).
	g *growth
}

// resourceRef locates one resource in its frame.
type resourceRef struct {
	name, version string
	off, n        int // the encoded Resource (Delta) or Any (SotW)
}

// newFrame parses data, taking over one reference of it: on error the
// reference is released.
func newFrame(delta bool, data mem.BufferSlice) (*frame, error) {
	f := &frame{delta: delta}
	if err := f.setData(data); err != nil {
		return nil, err
	}
	return f, nil
}

// flatFrame is a frame over one plain byte slice (responses the proxy
// builds itself, and tests).
func flatFrame(delta bool, b []byte) (*frame, error) {
	return newFrame(delta, mem.BufferSlice{mem.SliceBuffer(b)})
}

func (f *frame) setData(data mem.BufferSlice) error {
	f.data, f.size = data, data.Len()
	f.starts = make([]int, len(data))
	off := 0
	for i, b := range data {
		f.starts[i] = off
		off += b.Len()
	}
	f.refs.Store(1)
	if err := f.parse(); err != nil {
		f.release()
		return err
	}
	return nil
}

// hold adds a reference; it returns f for chaining.
func (f *frame) hold() *frame {
	if f.refs.Add(1) <= 1 {
		panic("xdsproxy: hold of a released frame")
	}
	return f
}

// release drops a reference; the last one returns the buffers to grpc's
// pool.
func (f *frame) release() {
	switch n := f.refs.Add(-1); {
	case n == 0:
		f.data.Free()
		f.data = nil
	case n < 0:
		panic("xdsproxy: frame released more often than held")
	}
}

// parse reads the envelope of the whole message, with the field reader of
// the incremental parser (incparse.go), so both read it the same way.
func (f *frame) parse() error {
	p := newIncParser(f.delta)
	if n := countResources(f.data); n > 0 {
		p.env.resources = make([]resourceRef, 0, n)
	}
	p.r = newReader(f.data)
	for p.r.remaining() > 0 {
		if _, err := p.field(true); err != nil {
			f.resources, f.removed = nil, nil
			return err
		}
	}
	e := &p.env
	f.typeURL, f.version, f.nonce, f.resources, f.removed = e.typeURL, e.version, e.nonce, e.resources, e.removed
	return nil
}

// countResources counts the resources field (the same number in both
// kinds), so parse allocates its index once: thousands of entries for a
// large push. Errors are left to parse.
func countResources(data mem.BufferSlice) int {
	r := newReader(data)
	n := 0
	for r.remaining() > 0 {
		num, typ, err := r.tag()
		if err == nil {
			err = r.skipValue(num, typ)
		}
		if err != nil {
			return n
		}
		if num == sotwResource && typ == protowire.BytesType {
			n++
		}
	}
	return n
}

// appendRange appends n bytes of the message from offset off to dst.
func (f *frame) appendRange(dst []byte, off, n int) []byte {
	w := appendWriter{dst}
	_ = f.writeRange(&w, off, n) // appendWriter never fails
	return w.b
}

// appendWriter appends what is written to b.
type appendWriter struct{ b []byte }

func (w *appendWriter) Write(p []byte) (int, error) {
	w.b = append(w.b, p...)
	return len(p), nil
}

// writeRange writes n bytes of the message from offset off to w.
func (f *frame) writeRange(w io.Writer, off, n int) error {
	i := sort.Search(len(f.starts), func(i int) bool { return f.starts[i] > off }) - 1
	off -= f.starts[i]
	for ; n > 0; i++ {
		b := f.data[i].ReadOnlyData()[off:]
		off = 0
		if len(b) > n {
			b = b[:n]
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
		n -= len(b)
	}
	return nil
}

// resourceBytes returns a copy of the i-th encoded resource.
func (f *frame) resourceBytes(i int) []byte {
	r := f.resources[i]
	return f.appendRange(make([]byte, 0, r.n), r.off, r.n)
}

// resourceValue returns the serialized resource inside the i-th resource
// (Any.value for SotW, Resource.resource.value for Delta).
func (f *frame) resourceValue(i int) ([]byte, error) {
	b := f.resourceBytes(i)
	if f.delta {
		inner, err := field(b, resAny)
		if err != nil {
			return nil, err
		}
		b = inner
	}
	return field(b, anyValue)
}

// withNonce returns a flat copy of a SotW frame whose nonce is replaced.
func (f *frame) withNonce(nonce string) *frame {
	out := make([]byte, 0, f.size+len(nonce)+8)
	r := newReader(f.data)
	for r.remaining() > 0 {
		start := r.off
		num, typ, err := r.tag()
		if err == nil {
			err = r.skipValue(num, typ)
		}
		if err != nil {
			break // cannot happen: f parsed
		}
		if num != sotwNonce {
			out = f.appendRange(out, start, r.off-start)
		}
	}
	out = protowire.AppendTag(out, sotwNonce, protowire.BytesType)
	out = protowire.AppendString(out, nonce)
	nf, err := flatFrame(false, out)
	if err != nil {
		panic("xdsproxy: re-nonced frame does not parse: " + err.Error())
	}
	return nf
}

// newDeltaFrame encodes a DeltaDiscoveryResponse from cached resources
// (whose frames the caller keeps held meanwhile).
func newDeltaFrame(typeURL, nonce string, resources []cachedResource, removed []string) (*frame, error) {
	n := len(typeURL) + len(nonce) + 16
	for _, c := range resources {
		n += c.r.n + 8
	}
	for _, r := range removed {
		n += len(r) + 8
	}
	b := make([]byte, 0, n)
	expanded := map[*blob][]byte{}
	for _, c := range resources {
		b = protowire.AppendTag(b, deltaResource, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(c.r.n))
		var err error
		if b, err = c.appendTo(b, expanded); err != nil {
			return nil, err
		}
	}
	b = protowire.AppendTag(b, deltaTypeURL, protowire.BytesType)
	b = protowire.AppendString(b, typeURL)
	b = protowire.AppendTag(b, deltaNonce, protowire.BytesType)
	b = protowire.AppendString(b, nonce)
	for _, r := range removed {
		b = protowire.AppendTag(b, deltaRemoved, protowire.BytesType)
		b = protowire.AppendString(b, r)
	}
	f, err := flatFrame(true, b)
	if err != nil {
		return nil, fmt.Errorf("cached configuration: %w", err)
	}
	return f, nil
}

func field(b []byte, want protowire.Number) ([]byte, error) {
	var out []byte
	err := forEachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if num == want && typ == protowire.BytesType {
			out = v
		}
		return nil
	})
	return out, err
}

var errMalformed = errors.New("malformed protobuf")

// forEachField calls fn for every top-level field of a flat message; v is
// the payload of length-delimited fields and nil for the others.
func forEachField(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errMalformed
		}
		b = b[n:]
		var v []byte
		if typ == protowire.BytesType {
			v, n = protowire.ConsumeBytes(b)
		} else {
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return errMalformed
		}
		b = b[n:]
		if err := fn(num, typ, v); err != nil {
			return err
		}
	}
	return nil
}

// rawCodec is grpc's proto codec, except that frames pass through as their
// buffers. It keeps the name "proto" so the wire content-type is unchanged.
type rawCodec struct{ proto encoding.CodecV2 }

func newRawCodec() rawCodec { return rawCodec{proto: encoding.GetCodecV2("proto")} }

func (c rawCodec) Name() string { return "proto" }

func (c rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if f, ok := v.(*frame); ok {
		// grpc frees what Marshal returns once it is written: give it a
		// reference of its own. The sender holds the frame meanwhile.
		f.data.Ref()
		return f.data, nil
	}
	return c.proto.Marshal(v)
}

func (c rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if f, ok := v.(*frame); ok {
		// grpc frees data after Unmarshal: keep a reference instead of
		// copying it out.
		data.Ref()
		return f.setData(data)
	}
	return c.proto.Unmarshal(data, v)
}
