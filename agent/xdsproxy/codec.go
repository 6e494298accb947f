package xdsproxy

import (
	"errors"
	"fmt"

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

// frame is a discovery response kept as the bytes that came off the wire.
// The proxy reads only the envelope (type, version, nonce, and for Delta the
// resource names and versions) and forwards the bytes unchanged, so a 7 MB
// CDS push is never decoded into Go structs nor encoded again.
type frame struct {
	delta bool
	raw   []byte

	typeURL, version, nonce string
	// resources: for SotW the encoded Any messages (parsed only on demand);
	// for Delta one entry per Resource.
	resources []resourceRef
	removed   []string

	// Set by the proxy, not the wire: the upstream stream generation the
	// frame came from (0 = served from the last-known-good cache).
	gen uint64
}

// resourceRef points into frame.raw.
type resourceRef struct {
	name, version string
	raw           []byte // the encoded Resource (Delta) or Any (SotW)
}

// parse reads the envelope of f.raw.
func (f *frame) parse() error {
	f.resources, f.removed = f.resources[:0], f.removed[:0]
	return forEachField(f.raw, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch {
		case num == sotwVersion: // same number for both kinds
			f.version = string(v)
		case num == sotwTypeURL:
			f.typeURL = string(v)
		case num == sotwNonce:
			f.nonce = string(v)
		case num == sotwResource && !f.delta:
			f.resources = append(f.resources, resourceRef{raw: v})
		case num == deltaResource && f.delta:
			r := resourceRef{raw: v}
			err := forEachField(v, func(num protowire.Number, typ protowire.Type, v []byte) error {
				switch {
				case typ != protowire.BytesType:
				case num == resName:
					r.name = string(v)
				case num == resVersion:
					r.version = string(v)
				}
				return nil
			})
			if err != nil {
				return fmt.Errorf("resource: %w", err)
			}
			f.resources = append(f.resources, r)
		case num == deltaRemoved && f.delta:
			f.removed = append(f.removed, string(v))
		}
		return nil
	})
}

// resourceValue returns the serialized resource inside the i-th resource
// (Any.value for SotW, Resource.resource.value for Delta).
func (f *frame) resourceValue(i int) ([]byte, error) {
	b := f.resources[i].raw
	if f.delta {
		inner, err := field(b, resAny)
		if err != nil {
			return nil, err
		}
		b = inner
	}
	return field(b, anyValue)
}

// withNonce returns a copy of a SotW frame whose nonce is replaced.
func (f *frame) withNonce(nonce string) *frame {
	out := make([]byte, 0, len(f.raw)+len(nonce)+8)
	_ = forEachFieldRaw(f.raw, func(num protowire.Number, rawField []byte) {
		if num != sotwNonce {
			out = append(out, rawField...)
		}
	})
	out = protowire.AppendTag(out, sotwNonce, protowire.BytesType)
	out = protowire.AppendString(out, nonce)
	nf := *f
	nf.raw, nf.nonce, nf.gen = out, nonce, 0
	_ = nf.parse()
	return &nf
}

// newDeltaFrame encodes a DeltaDiscoveryResponse from already-encoded
// Resource messages.
func newDeltaFrame(typeURL, nonce string, resources []resourceRef, removed []string) *frame {
	n := len(typeURL) + len(nonce) + 16
	for _, r := range resources {
		n += len(r.raw) + 8
	}
	b := make([]byte, 0, n)
	for _, r := range resources {
		b = protowire.AppendTag(b, deltaResource, protowire.BytesType)
		b = protowire.AppendBytes(b, r.raw)
	}
	b = protowire.AppendTag(b, deltaTypeURL, protowire.BytesType)
	b = protowire.AppendString(b, typeURL)
	b = protowire.AppendTag(b, deltaNonce, protowire.BytesType)
	b = protowire.AppendString(b, nonce)
	for _, r := range removed {
		b = protowire.AppendTag(b, deltaRemoved, protowire.BytesType)
		b = protowire.AppendString(b, r)
	}
	f := &frame{delta: true, raw: b}
	_ = f.parse()
	return f
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

// forEachField calls fn for every top-level field; v is the payload of
// length-delimited fields and nil for the others.
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

// forEachFieldRaw calls fn with each top-level field's complete encoding.
func forEachFieldRaw(b []byte, fn func(num protowire.Number, rawField []byte)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errMalformed
		}
		m := protowire.ConsumeFieldValue(num, typ, b[n:])
		if m < 0 {
			return errMalformed
		}
		fn(num, b[:n+m])
		b = b[n+m:]
	}
	return nil
}

// rawCodec is grpc's proto codec, except that frames pass through as bytes.
// It keeps the name "proto" so the wire content-type is unchanged.
type rawCodec struct{ proto encoding.CodecV2 }

func newRawCodec() rawCodec { return rawCodec{proto: encoding.GetCodecV2("proto")} }

func (c rawCodec) Name() string { return "proto" }

func (c rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if f, ok := v.(*frame); ok {
		return mem.BufferSlice{mem.SliceBuffer(f.raw)}, nil
	}
	return c.proto.Marshal(v)
}

func (c rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if f, ok := v.(*frame); ok {
		// One contiguous copy: the transport's buffers are returned to its
		// pool after Unmarshal, and the proxy keeps the frame.
		f.raw = data.Materialize()
		return f.parse()
	}
	return c.proto.Unmarshal(data, v)
}
