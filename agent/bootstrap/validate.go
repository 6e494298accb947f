package bootstrap

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"sigs.k8s.io/yaml"
)

// FieldError is one problem in a bootstrap, at a field path written with
// Envoy's (proto) field names, e.g.
// static_resources.clusters[2].connect_timeout.
type FieldError struct {
	Path    string
	Problem string
}

func (e *FieldError) Error() string {
	if e.Path == "" {
		return e.Problem
	}
	return e.Path + ": " + e.Problem
}

// maxErrors caps how many problems one Validate reports.
const maxErrors = 20

// Validate checks an Envoy bootstrap ("json" or "yaml") the way Envoy would
// reject it at start, using Envoy's own protos: unknown fields, values of the
// wrong type, bad enum names, "@type"s this build cannot resolve, and the
// field constraints (PGV ValidateAll), including inside every Any, at any
// depth, and inside TypedStructs whose type is known. Every error names the
// field path. The e2e Envoy double uses this same function.
func Validate(data []byte, format string) error {
	_, err := parse(data, format)
	return err
}

// parse decodes and validates a bootstrap document.
func parse(data []byte, format string) (*bootstrapv3.Bootstrap, error) {
	js, err := documentJSON(data, format)
	if err != nil {
		return nil, err
	}
	b := &bootstrapv3.Bootstrap{}
	if err := decodeStrict(js, b); err != nil {
		return nil, err
	}
	if err := check(b); err != nil {
		return nil, err
	}
	return b, nil
}

func documentJSON(data []byte, format string) ([]byte, error) {
	switch strings.ToLower(format) {
	case "json", "":
		return data, nil
	case "yaml", "yml":
		js, err := yaml.YAMLToJSON(data)
		if err != nil {
			return nil, &FieldError{Problem: fmt.Sprintf("not valid YAML: %v", err)}
		}
		return js, nil
	}
	return nil, fmt.Errorf("unknown bootstrap format %q (want json or yaml)", format)
}

// decodeStrict decodes JSON into m, first walking it against m's descriptor
// so problems come out with a field path (protojson only gives line:column).
func decodeStrict(js []byte, m proto.Message) error {
	d := json.NewDecoder(bytes.NewReader(js))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return &FieldError{Problem: fmt.Sprintf("not valid JSON: %v", err)}
	}
	if d.More() {
		return &FieldError{Problem: "not valid JSON: data after the top-level value"}
	}
	w := &walker{}
	w.message("", m.ProtoReflect().Descriptor(), v)
	if len(w.errs) > 0 {
		return errors.Join(w.errs...)
	}
	opts := protojson.UnmarshalOptions{DiscardUnknown: false, Resolver: protoregistry.GlobalTypes}
	if err := opts.Unmarshal(js, m); err != nil {
		return &FieldError{Problem: err.Error()}
	}
	return nil
}

// walker checks decoded JSON against a message descriptor.
type walker struct {
	errs []error
}

func (w *walker) fail(path, format string, args ...any) {
	if len(w.errs) == maxErrors {
		w.errs = append(w.errs, errors.New("(more errors not shown)"))
	}
	if len(w.errs) > maxErrors {
		return
	}
	if path == "" {
		path = "(top level)"
	}
	w.errs = append(w.errs, &FieldError{Path: path, Problem: fmt.Sprintf(format, args...)})
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

func describe(v any) string {
	b, _ := json.Marshal(v)
	s := string(b)
	if len(s) > 60 {
		s = s[:57] + "..."
	}
	return s
}

var durationRE = regexp.MustCompile(`^-?\d+(\.\d{1,9})?s$`)

func (w *walker) message(path string, md protoreflect.MessageDescriptor, v any) {
	switch md.FullName() {
	case "google.protobuf.Any":
		w.anyValue(path, v)
		return
	case "google.protobuf.Struct":
		if _, ok := v.(map[string]any); !ok {
			w.fail(path, "%s is not an object", describe(v))
		}
		return
	case "google.protobuf.Value":
		return
	case "google.protobuf.ListValue":
		if _, ok := v.([]any); !ok {
			w.fail(path, "%s is not a list", describe(v))
		}
		return
	case "google.protobuf.Duration":
		if s, ok := v.(string); !ok || !durationRE.MatchString(s) {
			w.fail(path, "%s is not a duration (use e.g. \"1s\" or \"0.250s\")", describe(v))
		}
		return
	case "google.protobuf.Timestamp", "google.protobuf.FieldMask":
		if _, ok := v.(string); !ok {
			w.fail(path, "%s is not a string", describe(v))
		}
		return
	case "google.protobuf.DoubleValue", "google.protobuf.FloatValue", "google.protobuf.Int64Value",
		"google.protobuf.UInt64Value", "google.protobuf.Int32Value", "google.protobuf.UInt32Value",
		"google.protobuf.BoolValue", "google.protobuf.StringValue", "google.protobuf.BytesValue":
		w.scalar(path, md.Fields().ByName("value"), v)
		return
	}
	obj, ok := v.(map[string]any)
	if !ok {
		w.fail(path, "%s is not an object (%s)", describe(v), md.FullName())
		return
	}
	w.fields(path, md, obj, nil)
}

// fields checks the members of a JSON object; skip lists keys handled by the
// caller (an Any's "@type").
func (w *walker) fields(path string, md protoreflect.MessageDescriptor, obj map[string]any, skip map[string]bool) {
	fds := md.Fields()
	oneofs := map[protoreflect.FullName]string{}
	for _, k := range sortedKeys(obj) {
		if skip[k] {
			continue
		}
		fd := fds.ByJSONName(k)
		if fd == nil {
			fd = fds.ByTextName(k)
		}
		if fd == nil {
			w.fail(join(path, k), "unknown field in %s (check the name against Envoy's v3 API; Envoy rejects unknown fields)", md.FullName())
			continue
		}
		fpath := join(path, string(fd.Name()))
		val := obj[k]
		if val == nil {
			continue
		}
		if od := fd.ContainingOneof(); od != nil && !od.IsSynthetic() {
			if prev, dup := oneofs[od.FullName()]; dup {
				w.fail(fpath, "only one of %s and %s may be set (oneof %s)", prev, fd.Name(), od.Name())
			}
			oneofs[od.FullName()] = string(fd.Name())
		}
		w.field(fpath, fd, val)
	}
}

func (w *walker) field(path string, fd protoreflect.FieldDescriptor, v any) {
	switch {
	case fd.IsMap():
		obj, ok := v.(map[string]any)
		if !ok {
			w.fail(path, "%s is not an object (a map)", describe(v))
			return
		}
		for _, k := range sortedKeys(obj) {
			kpath := fmt.Sprintf("%s[%q]", path, k)
			w.mapKey(kpath, fd.MapKey(), k)
			if obj[k] == nil && fd.MapValue().Message() == nil {
				w.fail(kpath, "null is not a valid map value")
				continue
			}
			w.single(kpath, fd.MapValue(), obj[k])
		}
	case fd.IsList():
		list, ok := v.([]any)
		if !ok {
			w.fail(path, "%s is not a list", describe(v))
			return
		}
		for i, e := range list {
			epath := fmt.Sprintf("%s[%d]", path, i)
			if e == nil {
				w.fail(epath, "null is not a valid list element")
				continue
			}
			w.single(epath, fd, e)
		}
	default:
		w.single(path, fd, v)
	}
}

func (w *walker) single(path string, fd protoreflect.FieldDescriptor, v any) {
	if md := fd.Message(); md != nil {
		w.message(path, md, v)
		return
	}
	w.scalar(path, fd, v)
}

func (w *walker) mapKey(path string, fd protoreflect.FieldDescriptor, k string) {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		if k != "true" && k != "false" {
			w.fail(path, "map key %q is not true or false", k)
		}
	case protoreflect.StringKind:
	default:
		if _, err := strconv.ParseInt(k, 10, 64); err != nil {
			if _, err := strconv.ParseUint(k, 10, 64); err != nil {
				w.fail(path, "map key %q is not an integer", k)
			}
		}
	}
}

func (w *walker) scalar(path string, fd protoreflect.FieldDescriptor, v any) {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		if _, ok := v.(bool); !ok {
			w.fail(path, "%s is not a boolean (use true or false)", describe(v))
		}
	case protoreflect.StringKind:
		if _, ok := v.(string); !ok {
			w.fail(path, "%s is not a string", describe(v))
		}
	case protoreflect.BytesKind:
		s, ok := v.(string)
		if !ok {
			w.fail(path, "%s is not a base64 string", describe(v))
			return
		}
		if _, err := base64.StdEncoding.DecodeString(s); err != nil {
			if _, err := base64.URLEncoding.DecodeString(s); err != nil {
				if _, err := base64.RawStdEncoding.DecodeString(s); err != nil {
					if _, err := base64.RawURLEncoding.DecodeString(s); err != nil {
						w.fail(path, "%s is not base64", describe(v))
					}
				}
			}
		}
	case protoreflect.EnumKind:
		w.enum(path, fd.Enum(), v)
	case protoreflect.FloatKind, protoreflect.DoubleKind:
		switch x := v.(type) {
		case json.Number:
		case string:
			if x != "NaN" && x != "Infinity" && x != "-Infinity" {
				if _, err := strconv.ParseFloat(x, 64); err != nil {
					w.fail(path, "%s is not a number", describe(v))
				}
			}
		default:
			w.fail(path, "%s is not a number", describe(v))
		}
	default: // integers
		w.integer(path, fd.Kind(), v)
	}
}

func (w *walker) integer(path string, kind protoreflect.Kind, v any) {
	var s string
	switch x := v.(type) {
	case json.Number:
		s = string(x)
	case string:
		s = x
	default:
		w.fail(path, "%s is not an integer", describe(v))
		return
	}
	var lo, hi float64
	switch kind {
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		lo, hi = math.MinInt32, math.MaxInt32
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		lo, hi = 0, math.MaxUint32
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		if _, err := strconv.ParseUint(s, 10, 64); err == nil {
			return
		}
		lo, hi = 0, math.MaxUint64
	default:
		if _, err := strconv.ParseInt(s, 10, 64); err == nil {
			return
		}
		lo, hi = math.MinInt64, math.MaxInt64
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f != math.Trunc(f) {
		w.fail(path, "%s is not an integer", describe(v))
		return
	}
	if f < lo || f > hi {
		w.fail(path, "%s is out of range for %s", s, kind)
	}
}

func (w *walker) enum(path string, ed protoreflect.EnumDescriptor, v any) {
	if ed.FullName() == "google.protobuf.NullValue" {
		return
	}
	switch x := v.(type) {
	case string:
		if ed.Values().ByName(protoreflect.Name(x)) != nil {
			return
		}
		names := make([]string, 0, ed.Values().Len())
		for i := 0; i < ed.Values().Len() && i < 12; i++ {
			names = append(names, string(ed.Values().Get(i).Name()))
		}
		w.fail(path, "%q is not a valid %s (use one of %s)", x, ed.FullName(), strings.Join(names, ", "))
	case json.Number:
		if _, err := strconv.ParseInt(string(x), 10, 32); err != nil {
			w.fail(path, "%s is not a valid %s", x, ed.FullName())
		}
	default:
		w.fail(path, "%s is not a valid %s (use its name as a string)", describe(v), ed.FullName())
	}
}

// anyValue checks an Any in JSON form: {"@type": "...", fields...}, or
// {"@type": "...", "value": ...} for well-known types.
func (w *walker) anyValue(path string, v any) {
	obj, ok := v.(map[string]any)
	if !ok {
		w.fail(path, "%s is not an object with \"@type\"", describe(v))
		return
	}
	tv, ok := obj["@type"]
	if !ok {
		if len(obj) > 0 {
			w.fail(path, "typed config without \"@type\"")
		}
		return
	}
	url, ok := tv.(string)
	if !ok {
		w.fail(join(path, "@type"), "%s is not a string", describe(tv))
		return
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(url)
	if err != nil {
		w.fail(join(path, "@type"), "%q is not a type this build knows (check the spelling; Outrigger links the Envoy v3 types a bootstrap normally uses)", url)
		return
	}
	md := mt.Descriptor()
	if isWellKnownJSON(md.FullName()) {
		w.message(join(path, "value"), md, obj["value"])
		return
	}
	w.fields(path, md, obj, map[string]bool{"@type": true})
}

func isWellKnownJSON(n protoreflect.FullName) bool {
	return strings.HasPrefix(string(n), "google.protobuf.") && n != "google.protobuf.Empty"
}

// check runs the PGV constraints on b and, recursively, on every Any.
func check(b *bootstrapv3.Bootstrap) error {
	c := &checker{}
	c.validate("", b)
	c.walk("", b.ProtoReflect())
	if len(c.errs) > 0 {
		return errors.Join(c.errs...)
	}
	return nil
}

type checker struct {
	errs []error
}

func (c *checker) add(e error) {
	if len(c.errs) == maxErrors {
		c.errs = append(c.errs, errors.New("(more errors not shown)"))
	}
	if len(c.errs) <= maxErrors {
		c.errs = append(c.errs, e)
	}
}

// validate runs ValidateAll on m and records its errors with paths.
func (c *checker) validate(path string, m proto.Message) {
	va, ok := m.(interface{ ValidateAll() error })
	if !ok {
		return
	}
	if err := va.ValidateAll(); err != nil {
		var out []error
		flattenPGV(path, m.ProtoReflect().Descriptor(), err, &out)
		for _, e := range out {
			c.add(e)
		}
	}
}

// walk finds every Any under m, unpacks it and validates what is inside.
func (c *checker) walk(path string, m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		fpath := join(path, string(fd.Name()))
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() == nil {
				return true
			}
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				c.visit(fmt.Sprintf("%s[%q]", fpath, k.String()), mv.Message())
				return true
			})
		case fd.IsList():
			if fd.Message() == nil {
				return true
			}
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				c.visit(fmt.Sprintf("%s[%d]", fpath, i), l.Get(i).Message())
			}
		case fd.Message() != nil:
			c.visit(fpath, v.Message())
		}
		return true
	})
}

func (c *checker) visit(path string, m protoreflect.Message) {
	if m.Descriptor().FullName() != "google.protobuf.Any" {
		c.walk(path, m)
		return
	}
	a, ok := m.Interface().(*anypb.Any)
	if !ok {
		return
	}
	inner, err := a.UnmarshalNew()
	if err != nil {
		c.add(&FieldError{Path: path, Problem: fmt.Sprintf("cannot unpack %q: %v", a.GetTypeUrl(), err)})
		return
	}
	if ts, ok := typedStruct(inner); ok {
		c.typedStruct(path, ts.typeURL, ts.value)
		return
	}
	c.validate(path, inner)
	c.walk(path, inner.ProtoReflect())
}

type typedStructValue struct {
	typeURL string
	value   *structpb.Struct
}

// typedStruct recognises udpa.type.v1.TypedStruct and xds.type.v3.TypedStruct
// without naming their Go types (both have type_url and value fields).
func typedStruct(m proto.Message) (typedStructValue, bool) {
	r := m.ProtoReflect()
	switch r.Descriptor().FullName() {
	case "udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct":
	default:
		return typedStructValue{}, false
	}
	fds := r.Descriptor().Fields()
	url := r.Get(fds.ByName("type_url")).String()
	var st *structpb.Struct
	if vm := r.Get(fds.ByName("value")).Message(); vm.IsValid() {
		st, _ = vm.Interface().(*structpb.Struct)
	}
	return typedStructValue{typeURL: url, value: st}, true
}

// typedStruct validates a TypedStruct's value as its target type when this
// build knows the type; Envoy converts it the same way and rejects unknown
// fields. Unknown target types (Istio's own extensions) are left to Envoy.
func (c *checker) typedStruct(path, url string, st *structpb.Struct) {
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(url)
	if err != nil {
		return
	}
	vpath := join(path, "value")
	js := []byte("{}")
	if st != nil {
		if js, err = protojson.Marshal(st); err != nil {
			c.add(&FieldError{Path: vpath, Problem: err.Error()})
			return
		}
	}
	inner := mt.New().Interface()
	if err := decodeStrict(js, inner); err != nil {
		for _, e := range unwrapJoined(err) {
			var fe *FieldError
			if errors.As(e, &fe) {
				c.add(&FieldError{Path: join(vpath, fe.Path), Problem: fe.Problem})
				continue
			}
			c.add(&FieldError{Path: vpath, Problem: e.Error()})
		}
		return
	}
	c.validate(vpath, inner)
	c.walk(vpath, inner.ProtoReflect())
}

func unwrapJoined(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// pgvError is the method set of every protoc-gen-validate error.
type pgvError interface {
	error
	Field() string
	Reason() string
	Cause() error
}

// flattenPGV turns a PGV error tree (Go field names, nested causes,
// MultiErrors) into FieldErrors with proto field paths.
func flattenPGV(path string, md protoreflect.MessageDescriptor, err error, out *[]error) {
	if multi, ok := err.(interface{ AllErrors() []error }); ok {
		for _, e := range multi.AllErrors() {
			flattenPGV(path, md, e, out)
		}
		return
	}
	var pe pgvError
	if !errors.As(err, &pe) {
		*out = append(*out, &FieldError{Path: path, Problem: err.Error()})
		return
	}
	seg, child := pgvSegment(md, pe.Field())
	p := join(path, seg)
	if cause := pe.Cause(); cause != nil {
		_, isMulti := cause.(interface{ AllErrors() []error })
		var inner pgvError
		if isMulti || errors.As(cause, &inner) {
			flattenPGV(p, child, cause, out)
			return
		}
		*out = append(*out, &FieldError{Path: p, Problem: pe.Reason() + ": " + cause.Error()})
		return
	}
	*out = append(*out, &FieldError{Path: p, Problem: pe.Reason()})
}

// pgvSegment maps a PGV field name such as "Clusters[2]" or
// "TypedExtensionProtocolOptions[envoy.x]" to "clusters[2]" or
// `typed_extension_protocol_options["envoy.x"]`, and returns the descriptor
// of the message it refers to.
func pgvSegment(md protoreflect.MessageDescriptor, field string) (string, protoreflect.MessageDescriptor) {
	name, index, hasIndex := strings.Cut(field, "[")
	index = strings.TrimSuffix(index, "]")
	if md == nil {
		return field, nil
	}
	fds := md.Fields()
	for i := 0; i < fds.Len(); i++ {
		fd := fds.Get(i)
		if goCamelCase(string(fd.Name())) != name {
			continue
		}
		seg := string(fd.Name())
		var child protoreflect.MessageDescriptor
		switch {
		case fd.IsMap():
			child = fd.MapValue().Message()
			if hasIndex {
				if fd.MapKey().Kind() == protoreflect.StringKind {
					seg += fmt.Sprintf("[%q]", index)
				} else {
					seg += "[" + index + "]"
				}
			}
		default:
			child = fd.Message()
			if hasIndex {
				seg += "[" + index + "]"
			}
		}
		return seg, child
	}
	return field, nil
}

// goCamelCase is protoc-gen-go's field name mangling.
func goCamelCase(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.' && i+1 < len(s) && isASCIILower(s[i+1]):
		case c == '.':
			b = append(b, '_')
		case c == '_' && (i == 0 || s[i-1] == '.'):
			b = append(b, 'X')
		case c == '_' && i+1 < len(s) && isASCIILower(s[i+1]):
		case isASCIIDigit(c):
			b = append(b, c)
		default:
			if isASCIILower(c) {
				c -= 'a' - 'A'
			}
			b = append(b, c)
			for ; i+1 < len(s) && isASCIILower(s[i+1]); i++ {
				b = append(b, s[i+1])
			}
		}
	}
	return string(b)
}

func isASCIILower(c byte) bool { return 'a' <= c && c <= 'z' }
func isASCIIDigit(c byte) bool { return '0' <= c && c <= '9' }

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
