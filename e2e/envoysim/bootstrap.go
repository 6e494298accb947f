package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	"github.com/outrigger-mesh/outrigger/agent/bootstrap"

	// Every @type an Istio bootstrap or an xDS resource of the tests may
	// carry must be linked in, or protojson cannot resolve it (Envoy would
	// know them all).
	_ "github.com/cncf/xds/go/udpa/type/v1"
	_ "github.com/cncf/xds/go/xds/type/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/bootstrap/internal_listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/compression/brotli/compressor/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/compression/gzip/compressor/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/compression/zstd/compressor/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/compressor/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_stats/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/proxy_protocol/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/regex_engines/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/request_id/uuid/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/proxy_protocol/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/tcp/v3"
)

// loadBootstrap reads the -c file (JSON, or YAML by extension as Envoy
// decides), merges --config-yaml into it as Envoy does (proto merge: scalars
// replace, repeated fields append), and validates the result strictly.
func loadBootstrap(path, override string) (*bootstrapv3.Bootstrap, error) {
	b := &bootstrapv3.Bootstrap{}
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("unable to read file: %s", path)
		}
		// The agent's own strict check is the reference for "what Envoy
		// rejects": the double must fail exactly where the agent says
		// Envoy would.
		if err := bootstrap.Validate(data, formatOf(path, data)); err != nil {
			return nil, fmt.Errorf("unable to parse JSON/YAML as proto (%s): %w", path, err)
		}
		if err := unmarshalStrict(data, b); err != nil {
			return nil, fmt.Errorf("unable to parse JSON/YAML as proto (%s): %w", path, err)
		}
	}
	if override != "" {
		o := &bootstrapv3.Bootstrap{}
		if err := unmarshalStrict([]byte(override), o); err != nil {
			return nil, fmt.Errorf("--config-yaml: unable to parse as proto: %w", err)
		}
		proto.Merge(b, o)
		merged, err := protojson.Marshal(b)
		if err != nil {
			return nil, fmt.Errorf("--config-yaml: %w", err)
		}
		if err := bootstrap.Validate(merged, "json"); err != nil {
			return nil, fmt.Errorf("bootstrap with --config-yaml: %w", err)
		}
	}
	if path == "" && override == "" {
		return nil, errors.New("at least one of --config-path or --config-yaml or Options::configProto() should be non-empty")
	}
	if err := validateDeep(b); err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	return b, nil
}

// formatOf decides YAML or JSON as Envoy does: by extension, else by content.
func formatOf(path string, data []byte) string {
	if strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml") {
		return "yaml"
	}
	if strings.HasPrefix(strings.TrimSpace(string(data)), "{") {
		return "json"
	}
	return "yaml"
}

// unmarshalStrict parses JSON or YAML into m, rejecting unknown fields.
func unmarshalStrict(data []byte, m proto.Message) error {
	s := strings.TrimSpace(string(data))
	if !strings.HasPrefix(s, "{") {
		j, err := yaml.YAMLToJSON(data)
		if err != nil {
			return err
		}
		data = j
	}
	return protojson.UnmarshalOptions{DiscardUnknown: false}.Unmarshal(data, m)
}

// validateDeep runs the PGV field constraints on m and on every message
// packed in an Any inside it: ValidateAll does not look into Any.
func validateDeep(m proto.Message) error {
	if v, ok := m.(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	var errs []error
	walkAny(m.ProtoReflect(), "", func(path string, a *anypb.Any) {
		inner, err := a.UnmarshalNew()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", path, err))
			return
		}
		if err := validateDeep(inner); err != nil {
			errs = append(errs, fmt.Errorf("%s (%s): %w", path, a.GetTypeUrl(), err))
		}
	})
	return errors.Join(errs...)
}

// walkAny calls fn for each Any directly reachable from m (not inside
// another Any: validateDeep recurses for those).
func walkAny(m protoreflect.Message, path string, fn func(string, *anypb.Any)) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		fn(path, a)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		p := path + "." + string(fd.Name())
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				walkAny(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i), fn)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				walkAny(mv.Message(), fmt.Sprintf("%s[%v]", p, k.Interface()), fn)
				return true
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			walkAny(v.Message(), p, fn)
		}
		return true
	})
}
