package caclient

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// The messages of istio.io/api security/v1alpha1/ca.proto (package
// istio.v1.auth), encoded by hand with protowire: they are small, and there
// is no protoc here. Field numbers are part of the wire contract with istiod.
const (
	fieldRequestCSR      protowire.Number = 1
	fieldRequestSubject  protowire.Number = 2 // subject_id: retired upstream, skipped on decode
	fieldRequestValidity protowire.Number = 3
	fieldRequestMetadata protowire.Number = 4

	fieldResponseCertChain protowire.Number = 1
	fieldResponseRootCert  protowire.Number = 2
	fieldRootsCACert       protowire.Number = 1
)

// ServiceName and CreateCertificateMethod name the gRPC method on the wire.
const (
	ServiceName             = "istio.v1.auth.IstioCertificateService"
	CreateCertificateMethod = "/" + ServiceName + "/CreateCertificate"
)

// Request is IstioCertificateRequest.
type Request struct {
	// CSR is the PEM-encoded certificate signing request (field 1).
	CSR string
	// ValidityDuration is the requested lifetime in seconds (field 3).
	ValidityDuration int64
	// Metadata is opaque metadata for the CA, e.g. CertSigner (field 4).
	Metadata *structpb.Struct
}

// Response is IstioCertificateResponse.
type Response struct {
	// CertChain is leaf first; without RootCert the last entry holds the
	// roots (field 1).
	CertChain []string
	// RootCert is the trust bundle when the CA sends it apart (field 2,
	// message Roots{repeated string ca_cert = 1}). Nil when absent.
	RootCert []string
}

// Marshal encodes r in protobuf wire format (proto3: zero values omitted).
func (r *Request) Marshal() ([]byte, error) {
	var b []byte
	if r.CSR != "" {
		b = protowire.AppendTag(b, fieldRequestCSR, protowire.BytesType)
		b = protowire.AppendString(b, r.CSR)
	}
	if r.ValidityDuration != 0 {
		b = protowire.AppendTag(b, fieldRequestValidity, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(r.ValidityDuration))
	}
	if r.Metadata != nil {
		m, err := proto.MarshalOptions{Deterministic: true}.Marshal(r.Metadata)
		if err != nil {
			return nil, fmt.Errorf("marshal metadata: %w", err)
		}
		b = protowire.AppendTag(b, fieldRequestMetadata, protowire.BytesType)
		b = protowire.AppendBytes(b, m)
	}
	return b, nil
}

// Unmarshal decodes the wire format into r, skipping unknown fields.
func (r *Request) Unmarshal(b []byte) error {
	*r = Request{}
	return eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == fieldRequestCSR && typ == protowire.BytesType:
			r.CSR = string(v)
		case num == fieldRequestValidity && typ == protowire.VarintType:
			r.ValidityDuration = int64(x)
		case num == fieldRequestMetadata && typ == protowire.BytesType:
			if r.Metadata == nil {
				r.Metadata = &structpb.Struct{}
			}
			// Repeated occurrences of a message field merge, as proto does.
			if err := (proto.UnmarshalOptions{Merge: true}).Unmarshal(v, r.Metadata); err != nil {
				return fmt.Errorf("metadata: %w", err)
			}
		}
		return nil
	})
}

// Marshal encodes r in protobuf wire format.
func (r *Response) Marshal() ([]byte, error) {
	var b []byte
	for _, c := range r.CertChain {
		b = protowire.AppendTag(b, fieldResponseCertChain, protowire.BytesType)
		b = protowire.AppendString(b, c)
	}
	if r.RootCert != nil {
		var roots []byte
		for _, c := range r.RootCert {
			roots = protowire.AppendTag(roots, fieldRootsCACert, protowire.BytesType)
			roots = protowire.AppendString(roots, c)
		}
		b = protowire.AppendTag(b, fieldResponseRootCert, protowire.BytesType)
		b = protowire.AppendBytes(b, roots)
	}
	return b, nil
}

// Unmarshal decodes the wire format into r, skipping unknown fields.
func (r *Response) Unmarshal(b []byte) error {
	*r = Response{}
	return eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		switch {
		case num == fieldResponseCertChain && typ == protowire.BytesType:
			r.CertChain = append(r.CertChain, string(v))
		case num == fieldResponseRootCert && typ == protowire.BytesType:
			if r.RootCert == nil {
				r.RootCert = []string{}
			}
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if num == fieldRootsCACert && typ == protowire.BytesType {
					r.RootCert = append(r.RootCert, string(v))
				}
				return nil
			})
		}
		return nil
	})
}

// eachField walks the top-level fields of a message. For length-delimited
// fields v is the payload; for varints x is the value.
func eachField(b []byte, f func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("bad tag: %w", protowire.ParseError(n))
		}
		b = b[n:]
		var (
			v []byte
			x uint64
		)
		switch typ {
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if err := f(num, typ, v, x); err != nil {
			return err
		}
	}
	return nil
}

// wireMessage is what Codec encodes by hand.
type wireMessage interface {
	Marshal() ([]byte, error)
	Unmarshal([]byte) error
}

// Codec is a gRPC codec named "proto" (so the content-type is the one istiod
// expects) that encodes Request and Response by hand and any generated proto
// message as usual. Clients pass it with grpc.ForceCodecV2, servers with
// grpc.ForceServerCodecV2.
type Codec struct{}

var _ encoding.CodecV2 = Codec{}

// Name implements encoding.CodecV2.
func (Codec) Name() string { return "proto" }

// Marshal implements encoding.CodecV2.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	var (
		b   []byte
		err error
	)
	switch m := v.(type) {
	case wireMessage:
		b, err = m.Marshal()
	case proto.Message:
		b, err = proto.Marshal(m)
	default:
		return nil, fmt.Errorf("caclient codec: cannot marshal %T", v)
	}
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

// Unmarshal implements encoding.CodecV2.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	b := data.Materialize()
	switch m := v.(type) {
	case wireMessage:
		return m.Unmarshal(b)
	case proto.Message:
		return proto.Unmarshal(b, m)
	default:
		return fmt.Errorf("caclient codec: cannot unmarshal into %T", v)
	}
}
