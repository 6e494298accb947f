// Package nds is Istio's DNS name table (NDS), the resource the control plane
// sends so the agent's DNS proxy can answer mesh names. The types are
// wire-compatible with istio.networking.nds.v1 (pkg/dns/proto/nds.proto in
// Istio) and are encoded by hand with protowire: the message is small and
// stable, and hand-coding keeps generated code and protoc out of the build.
package nds

import (
	"fmt"
	"sort"

	"google.golang.org/protobuf/encoding/protowire"
)

// TypeURL is the xDS type of the name table.
const TypeURL = "type.googleapis.com/istio.networking.nds.v1.NameTable"

// NameInfo is what the table knows about one host.
type NameInfo struct {
	// IPs are the host's addresses, v4 and v6 mixed (field 1).
	IPs []string `json:"ips,omitempty"`
	// Registry is "Kubernetes" for services from the cluster (field 2).
	Registry string `json:"registry,omitempty"`
	// Shortname is the service name without namespace (field 3).
	Shortname string `json:"shortname,omitempty"`
	// Namespace is the service's namespace (field 4).
	Namespace string `json:"namespace,omitempty"`
	// AltHosts are extra names for the host; deprecated in Istio (field 5).
	AltHosts []string `json:"altHosts,omitempty"`
}

// NameTable maps host names to what is known about them (field 1).
type NameTable struct {
	Table map[string]*NameInfo `json:"table"`
}

const (
	fieldTable = 1

	fieldMapKey   = 1
	fieldMapValue = 2

	fieldIPs       = 1
	fieldRegistry  = 2
	fieldShortname = 3
	fieldNamespace = 4
	fieldAltHosts  = 5
)

// Marshal encodes the table in protobuf wire format. Map entries are written
// in sorted key order so the output is deterministic.
func (t *NameTable) Marshal() []byte {
	if t == nil {
		return nil
	}
	keys := make([]string, 0, len(t.Table))
	for k := range t.Table {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b []byte
	for _, k := range keys {
		var entry []byte
		entry = protowire.AppendTag(entry, fieldMapKey, protowire.BytesType)
		entry = protowire.AppendString(entry, k)
		if info := t.Table[k]; info != nil {
			entry = protowire.AppendTag(entry, fieldMapValue, protowire.BytesType)
			entry = protowire.AppendBytes(entry, info.marshal())
		}
		b = protowire.AppendTag(b, fieldTable, protowire.BytesType)
		b = protowire.AppendBytes(b, entry)
	}
	return b
}

func (n *NameInfo) marshal() []byte {
	var b []byte
	for _, ip := range n.IPs {
		b = appendString(b, fieldIPs, ip)
	}
	if n.Registry != "" {
		b = appendString(b, fieldRegistry, n.Registry)
	}
	if n.Shortname != "" {
		b = appendString(b, fieldShortname, n.Shortname)
	}
	if n.Namespace != "" {
		b = appendString(b, fieldNamespace, n.Namespace)
	}
	for _, h := range n.AltHosts {
		b = appendString(b, fieldAltHosts, h)
	}
	return b
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// Unmarshal decodes a NameTable from protobuf wire format. Unknown fields are
// skipped, as protobuf requires; malformed input is an error, never a panic.
func Unmarshal(b []byte) (*NameTable, error) {
	t := &NameTable{Table: map[string]*NameInfo{}}
	err := forEachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if num != fieldTable {
			return nil
		}
		if typ != protowire.BytesType {
			return fmt.Errorf("nds: field table has wire type %d, want bytes", typ)
		}
		var key string
		info := &NameInfo{}
		err := forEachField(v, func(num protowire.Number, typ protowire.Type, v []byte) error {
			if typ != protowire.BytesType {
				return nil
			}
			switch num {
			case fieldMapKey:
				key = string(v)
			case fieldMapValue:
				var err error
				if info, err = unmarshalInfo(v); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("nds: table entry: %w", err)
		}
		t.Table[key] = info
		return nil
	})
	if err != nil {
		return nil, err
	}
	return t, nil
}

func unmarshalInfo(b []byte) (*NameInfo, error) {
	n := &NameInfo{}
	err := forEachField(b, func(num protowire.Number, typ protowire.Type, v []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case fieldIPs:
			n.IPs = append(n.IPs, string(v))
		case fieldRegistry:
			n.Registry = string(v)
		case fieldShortname:
			n.Shortname = string(v)
		case fieldNamespace:
			n.Namespace = string(v)
		case fieldAltHosts:
			n.AltHosts = append(n.AltHosts, string(v))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("name info: %w", err)
	}
	return n, nil
}

// forEachField walks the top-level fields of a message. For bytes fields v is
// the payload; for other wire types v is nil.
func forEachField(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("bad tag: %w", protowire.ParseError(n))
		}
		b = b[n:]
		var v []byte
		if typ == protowire.BytesType {
			v, n = protowire.ConsumeBytes(b)
		} else {
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if err := fn(num, typ, v); err != nil {
			return err
		}
	}
	return nil
}
