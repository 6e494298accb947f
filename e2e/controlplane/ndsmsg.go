package controlplane

import (
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// nameTableType describes istio.networking.nds.v1.NameTable by hand, so the
// snapshot cache can hold the table as a proto.Message without generated
// code. Field numbers follow Istio's nds.proto.
func nameTableType() (protoreflect.MessageDescriptor, error) {
	s := proto.String
	i := proto.Int32
	str := descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum()
	msg := descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum()
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	rep := descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
	fd := &descriptorpb.FileDescriptorProto{
		Name:    s("outrigger/e2e/nds.proto"),
		Package: s("istio.networking.nds.v1"),
		Syntax:  s("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			{
				Name: s("NameTable"),
				Field: []*descriptorpb.FieldDescriptorProto{
					{Name: s("table"), JsonName: s("table"), Number: i(1), Label: rep, Type: msg, TypeName: s(".istio.networking.nds.v1.NameTable.TableEntry")},
				},
				NestedType: []*descriptorpb.DescriptorProto{{
					Name: s("TableEntry"),
					Field: []*descriptorpb.FieldDescriptorProto{
						{Name: s("key"), JsonName: s("key"), Number: i(1), Label: opt, Type: str},
						{Name: s("value"), JsonName: s("value"), Number: i(2), Label: opt, Type: msg, TypeName: s(".istio.networking.nds.v1.NameInfo")},
					},
					Options: &descriptorpb.MessageOptions{MapEntry: proto.Bool(true)},
				}},
			},
			{
				Name: s("NameInfo"),
				Field: []*descriptorpb.FieldDescriptorProto{
					{Name: s("ips"), JsonName: s("ips"), Number: i(1), Label: rep, Type: str},
					{Name: s("registry"), JsonName: s("registry"), Number: i(2), Label: opt, Type: str},
					{Name: s("shortname"), JsonName: s("shortname"), Number: i(3), Label: opt, Type: str},
					{Name: s("namespace"), JsonName: s("namespace"), Number: i(4), Label: opt, Type: str},
					{Name: s("alt_hosts"), JsonName: s("altHosts"), Number: i(5), Label: rep, Type: str},
				},
			},
		},
	}
	f, err := protodesc.NewFile(fd, nil)
	if err != nil {
		return nil, fmt.Errorf("controlplane: NameTable descriptor: %w", err)
	}
	return f.Messages().ByName("NameTable"), nil
}

// nameTableMessage turns a table into a proto.Message the cache can serve.
func nameTableMessage(md protoreflect.MessageDescriptor, t *nds.NameTable) (proto.Message, error) {
	m := dynamicpb.NewMessage(md)
	if err := proto.Unmarshal(t.Marshal(), m); err != nil {
		return nil, fmt.Errorf("controlplane: encode name table: %w", err)
	}
	return m, nil
}
