package nds

import (
	"encoding/hex"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// ndsDescriptor is Istio's nds.proto, rebuilt as a descriptor so the test can
// check our hand-written codec against the real protobuf implementation.
func ndsDescriptor(t *testing.T) *descriptorpb.FileDescriptorProto {
	t.Helper()
	str := descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum()
	msg := descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum()
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	rep := descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
	field := func(name string, num int32, label *descriptorpb.FieldDescriptorProto_Label, typ *descriptorpb.FieldDescriptorProto_Type, typeName string) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{Name: proto.String(name), Number: proto.Int32(num), Label: label, Type: typ, JsonName: proto.String(name)}
		if typeName != "" {
			f.TypeName = proto.String(typeName)
		}
		return f
	}
	return &descriptorpb.FileDescriptorProto{
		Name:    proto.String("nds.proto"),
		Package: proto.String("istio.networking.nds.v1"),
		Syntax:  proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			{
				Name:  proto.String("NameTable"),
				Field: []*descriptorpb.FieldDescriptorProto{field("table", 1, rep, msg, ".istio.networking.nds.v1.NameTable.TableEntry")},
				NestedType: []*descriptorpb.DescriptorProto{{
					Name: proto.String("TableEntry"),
					Field: []*descriptorpb.FieldDescriptorProto{
						field("key", 1, opt, str, ""),
						field("value", 2, opt, msg, ".istio.networking.nds.v1.NameTable.NameInfo"),
					},
					Options: &descriptorpb.MessageOptions{MapEntry: proto.Bool(true)},
				}, {
					Name: proto.String("NameInfo"),
					Field: []*descriptorpb.FieldDescriptorProto{
						field("ips", 1, rep, str, ""),
						field("registry", 2, opt, str, ""),
						field("shortname", 3, opt, str, ""),
						field("namespace", 4, opt, str, ""),
						field("alt_hosts", 5, rep, str, ""),
					},
				}},
			},
		},
	}
}

func sample() *NameTable {
	return &NameTable{Table: map[string]*NameInfo{
		"reviews.default.svc.cluster.local": {
			IPs: []string{"10.96.1.2", "fd00::1:2"}, Registry: "Kubernetes",
			Shortname: "reviews", Namespace: "default",
		},
		"api.example.com":    {IPs: []string{"240.240.0.1"}, Registry: "External", AltHosts: []string{"api.example.com.default.svc.cluster.local"}},
		"*.wild.example.com": {IPs: []string{"240.240.0.2"}},
	}}
}

func TestRoundTripWithRealProtobuf(t *testing.T) {
	fd, err := protodesc.NewFile(ndsDescriptor(t), nil)
	if err != nil {
		t.Fatalf("descriptor: %v", err)
	}
	md := fd.Messages().ByName("NameTable")
	want := sample()

	// Ours → real protobuf → ours.
	dyn := dynamicpb.NewMessage(md)
	if err := proto.Unmarshal(want.Marshal(), dyn); err != nil {
		t.Fatalf("real protobuf cannot parse our bytes: %v", err)
	}
	if got := dyn.Get(md.Fields().ByName("table")).Map().Len(); got != len(want.Table) {
		t.Fatalf("real protobuf sees %d entries, want %d", got, len(want.Table))
	}
	realBytes, err := proto.MarshalOptions{Deterministic: true}.Marshal(dyn)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Unmarshal(realBytes)
	if err != nil {
		t.Fatalf("Unmarshal(real protobuf bytes): %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("round trip mismatch (-want +got):\n%s", diff)
	}
	if hex.EncodeToString(realBytes) != hex.EncodeToString(want.Marshal()) {
		t.Errorf("our encoding differs from deterministic protobuf encoding")
	}
}

func TestUnmarshalMalformed(t *testing.T) {
	good := sample().Marshal()
	for i := 0; i < len(good); i++ {
		// Every truncation must be either a clean error or a valid table.
		_, _ = Unmarshal(good[:i])
	}
	if _, err := Unmarshal([]byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f}); err == nil {
		t.Error("oversized length prefix: want error")
	}
	if _, err := Unmarshal([]byte{0x08, 0x01}); err == nil {
		t.Error("table as varint: want error")
	}
}

func FuzzUnmarshal(f *testing.F) {
	f.Add(sample().Marshal())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		nt, err := Unmarshal(b)
		if err != nil {
			return
		}
		// Whatever parses must survive a round trip.
		if _, err := Unmarshal(nt.Marshal()); err != nil {
			t.Fatalf("re-encoded table does not parse: %v", err)
		}
	})
}
