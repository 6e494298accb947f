package caclient

import (
	"encoding/hex"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// caProto describes istio/api security/v1alpha1/ca.proto as published, so
// the hand encoding is checked against the protobuf runtime itself.
func caProto(t *testing.T) protoreflect.FileDescriptor {
	t.Helper()
	s := func(v string) *string { return &v }
	n := func(v int32) *int32 { return &v }
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	rep := descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
	str := descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum()
	i64 := descriptorpb.FieldDescriptorProto_TYPE_INT64.Enum()
	msg := descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum()
	fd := &descriptorpb.FileDescriptorProto{
		Name:       s("security/v1alpha1/ca.proto"),
		Package:    s("istio.v1.auth"),
		Syntax:     s("proto3"),
		Dependency: []string{"google/protobuf/struct.proto"},
		MessageType: []*descriptorpb.DescriptorProto{
			{Name: s("IstioCertificateRequest"), Field: []*descriptorpb.FieldDescriptorProto{
				{Name: s("csr"), Number: n(1), Label: opt, Type: str, JsonName: s("csr")},
				{Name: s("validity_duration"), Number: n(3), Label: opt, Type: i64, JsonName: s("validityDuration")},
				{Name: s("metadata"), Number: n(4), Label: opt, Type: msg, TypeName: s(".google.protobuf.Struct"), JsonName: s("metadata")},
			}},
			{Name: s("IstioCertificateResponse"), Field: []*descriptorpb.FieldDescriptorProto{
				{Name: s("cert_chain"), Number: n(1), Label: rep, Type: str, JsonName: s("certChain")},
				{Name: s("root_cert"), Number: n(2), Label: opt, Type: msg, TypeName: s(".istio.v1.auth.Roots"), JsonName: s("rootCert")},
			}},
			{Name: s("Roots"), Field: []*descriptorpb.FieldDescriptorProto{
				{Name: s("ca_cert"), Number: n(1), Label: rep, Type: str, JsonName: s("caCert")},
			}},
		},
	}
	f, err := protodesc.NewFile(fd, protoregistry.GlobalFiles)
	if err != nil {
		t.Fatalf("build descriptor: %v", err)
	}
	return f
}

func TestRequestWireMatchesProtobuf(t *testing.T) {
	md := caProto(t).Messages().ByName("IstioCertificateRequest")
	meta := &structpb.Struct{Fields: map[string]*structpb.Value{"CertSigner": structpb.NewStringValue("signer-a")}}
	tests := []struct {
		name string
		req  Request
	}{
		{"empty", Request{}},
		{"csr only", Request{CSR: "-----BEGIN CERTIFICATE REQUEST-----\nabc\n"}},
		{"all", Request{CSR: "csr", ValidityDuration: 86400, Metadata: meta}},
		{"negative ttl", Request{CSR: "x", ValidityDuration: -5}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.req.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			dm := dynamicpb.NewMessage(md)
			if tc.req.CSR != "" {
				dm.Set(md.Fields().ByName("csr"), protoreflect.ValueOfString(tc.req.CSR))
			}
			if tc.req.ValidityDuration != 0 {
				dm.Set(md.Fields().ByName("validity_duration"), protoreflect.ValueOfInt64(tc.req.ValidityDuration))
			}
			if tc.req.Metadata != nil {
				dm.Set(md.Fields().ByName("metadata"), protoreflect.ValueOfMessage(tc.req.Metadata.ProtoReflect()))
			}
			want, err := proto.MarshalOptions{Deterministic: true}.Marshal(dm)
			if err != nil {
				t.Fatal(err)
			}
			// The protobuf runtime may order fields differently (dynamicpb
			// does not promise an order); what must hold is that it parses
			// our bytes into exactly the reference message.
			parsed := dynamicpb.NewMessage(md)
			if err := proto.Unmarshal(got, parsed); err != nil {
				t.Fatalf("protobuf cannot parse our bytes %x: %v", got, err)
			}
			if !proto.Equal(parsed, dm) {
				t.Errorf("protobuf reads our bytes as %v, want %v (ours %x, reference %x)", parsed, dm, got, want)
			}
			var back Request
			if err := back.Unmarshal(want); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.req, back, protocmp.Transform(), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("round trip (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRequestExactBytes(t *testing.T) {
	// csr="ab" (field 1, LEN), validity_duration=300 (field 3, VARINT).
	got, err := (&Request{CSR: "ab", ValidityDuration: 300}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if want := "0a02616218ac02"; hex.EncodeToString(got) != want {
		t.Errorf("got %x, want %s", got, want)
	}
}

func TestResponseWireMatchesProtobuf(t *testing.T) {
	f := caProto(t)
	md := f.Messages().ByName("IstioCertificateResponse")
	rootsMD := f.Messages().ByName("Roots")
	tests := []struct {
		name string
		resp Response
	}{
		{"chain with root last", Response{CertChain: []string{"leaf", "root"}}},
		{"roots apart", Response{CertChain: []string{"leaf", "inter"}, RootCert: []string{"r1", "r2"}}},
		{"empty roots message", Response{CertChain: []string{"leaf"}, RootCert: []string{}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dm := dynamicpb.NewMessage(md)
			l := dm.Mutable(md.Fields().ByName("cert_chain")).List()
			for _, c := range tc.resp.CertChain {
				l.Append(protoreflect.ValueOfString(c))
			}
			if tc.resp.RootCert != nil {
				r := dynamicpb.NewMessage(rootsMD)
				rl := r.Mutable(rootsMD.Fields().ByName("ca_cert")).List()
				for _, c := range tc.resp.RootCert {
					rl.Append(protoreflect.ValueOfString(c))
				}
				dm.Set(md.Fields().ByName("root_cert"), protoreflect.ValueOfMessage(r))
			}
			want, err := proto.Marshal(dm)
			if err != nil {
				t.Fatal(err)
			}
			got, err := tc.resp.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			// The protobuf runtime may order fields differently (dynamicpb
			// does not promise an order); what must hold is that it parses
			// our bytes into exactly the reference message.
			parsed := dynamicpb.NewMessage(md)
			if err := proto.Unmarshal(got, parsed); err != nil {
				t.Fatalf("protobuf cannot parse our bytes %x: %v", got, err)
			}
			if !proto.Equal(parsed, dm) {
				t.Errorf("protobuf reads our bytes as %v, want %v (ours %x, reference %x)", parsed, dm, got, want)
			}
			var back Response
			if err := back.Unmarshal(want); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.resp, back); diff != "" {
				t.Errorf("round trip (-want +got):\n%s", diff)
			}
		})
	}
}

func TestUnmarshalSkipsUnknownAndRejectsGarbage(t *testing.T) {
	// subject_id (field 2, retired) and an unknown fixed64 field 9 before csr.
	b := []byte{0x12, 0x01, 'x', 0x49, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x01, 'c'}
	var r Request
	if err := r.Unmarshal(b); err != nil {
		t.Fatalf("Unmarshal: %v", err)
	}
	if r.CSR != "c" {
		t.Errorf("CSR = %q, want c", r.CSR)
	}
	for _, bad := range [][]byte{{0x0a, 0x05, 'a'}, {0x0a}, {0xff}} {
		if err := (&Response{}).Unmarshal(bad); err == nil {
			t.Errorf("Unmarshal(%x) succeeded, want error", bad)
		}
	}
}

func TestSplitResponse(t *testing.T) {
	tests := []struct {
		name               string
		resp               Response
		wantChain, wantRts string
		wantErr            bool
	}{
		{"root last", Response{CertChain: []string{"L", "I", "R"}}, "L\nI\n", "R\n", false},
		{"roots apart", Response{CertChain: []string{"L"}, RootCert: []string{"R1", "R2"}}, "L\n", "R1\nR2\n", false},
		{"leaf only", Response{CertChain: []string{"L"}}, "", "", true},
		{"nothing", Response{}, "", "", true},
		{"roots but no chain", Response{RootCert: []string{"R"}}, "", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, r, err := SplitResponse(&tc.resp)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if string(c) != tc.wantChain || string(r) != tc.wantRts {
				t.Errorf("got chain %q roots %q, want %q %q", c, r, tc.wantChain, tc.wantRts)
			}
		})
	}
}

func FuzzResponseUnmarshal(f *testing.F) {
	seed, _ := (&Response{CertChain: []string{"a", "b"}, RootCert: []string{"r"}}).Marshal()
	f.Add(seed)
	f.Add([]byte{0x0a, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Response
		if err := r.Unmarshal(b); err != nil {
			return
		}
		// Whatever decodes must encode and decode to the same value.
		again, err := r.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		var r2 Response
		if err := r2.Unmarshal(again); err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if diff := cmp.Diff(r, r2); diff != "" {
			t.Errorf("unstable (-first +second):\n%s", diff)
		}
	})
}

func FuzzRequestUnmarshal(f *testing.F) {
	seed, _ := (&Request{CSR: "c", ValidityDuration: 5, Metadata: &structpb.Struct{}}).Marshal()
	f.Add(seed)
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Request
		_ = r.Unmarshal(b)
	})
}
