package h2grpc

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"golang.org/x/net/http2"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// errCodeToGRPC maps an RST_STREAM error code to the gRPC code grpc-go gives
// the application, so a relay sees the same codes a grpc-go client would.
func errCodeToGRPC(c http2.ErrCode) codes.Code {
	switch c {
	case http2.ErrCodeFlowControl, http2.ErrCodeEnhanceYourCalm:
		return codes.ResourceExhausted
	case http2.ErrCodeRefusedStream:
		return codes.Unavailable
	case http2.ErrCodeCancel:
		return codes.Canceled
	case http2.ErrCodeInadequateSecurity:
		return codes.PermissionDenied
	default:
		return codes.Internal
	}
}

// httpStatusToGRPC maps the :status of a non-gRPC response as grpc-go does.
func httpStatusToGRPC(s int) codes.Code {
	switch s {
	case http.StatusBadRequest:
		return codes.Internal
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusForbidden:
		return codes.PermissionDenied
	case http.StatusNotFound:
		return codes.Unimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return codes.Unavailable
	default:
		return codes.Unknown
	}
}

// isGRPCContentType reports whether ct is application/grpc, optionally with a
// "+subtype" or ";params" suffix.
func isGRPCContentType(ct string) bool {
	const base = "application/grpc"
	if !strings.HasPrefix(ct, base) {
		return false
	}
	if len(ct) == len(base) {
		return true
	}
	return ct[len(base)] == '+' || ct[len(base)] == ';'
}

// encodeGRPCMessage percent-encodes msg for the grpc-message trailer: every
// byte outside printable ASCII, and '%' itself.
func encodeGRPCMessage(msg string) string {
	clean := true
	for i := 0; i < len(msg); i++ {
		if c := msg[i]; c < ' ' || c > '~' || c == '%' {
			clean = false
			break
		}
	}
	if clean {
		return msg
	}
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		if c < ' ' || c > '~' || c == '%' {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&0xf])
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// decodeGRPCMessage undoes encodeGRPCMessage; a malformed escape is kept as is.
func decodeGRPCMessage(msg string) string {
	if !strings.Contains(msg, "%") {
		return msg
	}
	var b strings.Builder
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		if c == '%' && i+2 < len(msg) {
			if v, err := strconv.ParseUint(msg[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(c)
	}
	return b.String()
}

// statusFromError turns a handler's error into the status sent in trailers:
// nil is OK, a gRPC status error keeps its code, message and details, any
// other error is Unknown with its text.
func statusFromError(err error) *status.Status {
	if err == nil {
		return status.New(codes.OK, "")
	}
	if s, ok := status.FromError(err); ok {
		return s
	}
	return status.New(codes.Unknown, err.Error())
}

// statusFromTrailers builds the status a client reports from the trailer
// fields grpc-status, grpc-message and grpc-status-details-bin.
func statusFromTrailers(code, msg, details string, haveCode bool) *status.Status {
	if !haveCode {
		return status.New(codes.Unknown, "h2grpc: server sent no grpc-status in trailers")
	}
	n, err := strconv.ParseUint(code, 10, 32)
	if err != nil {
		return status.New(codes.Unknown, fmt.Sprintf("h2grpc: malformed grpc-status %q", code))
	}
	c := codes.Code(n)
	msg = decodeGRPCMessage(msg)
	if details != "" {
		if raw, err := decodeBinHeader(details); err == nil {
			p := &spb.Status{}
			if proto.Unmarshal(raw, p) == nil && codes.Code(p.GetCode()) == c {
				return status.FromProto(p)
			}
		}
	}
	return status.New(c, msg)
}

// decodeBinHeader decodes a "-bin" header value, padded or not.
func decodeBinHeader(v string) ([]byte, error) {
	if len(v)%4 == 0 {
		return base64.StdEncoding.DecodeString(v)
	}
	return base64.RawStdEncoding.DecodeString(v)
}

// encodeStatusDetails returns the grpc-status-details-bin value for s, or ""
// when s carries no details.
func encodeStatusDetails(s *status.Status) string {
	p := s.Proto()
	if len(p.GetDetails()) == 0 {
		return ""
	}
	raw, err := proto.Marshal(p)
	if err != nil {
		return ""
	}
	return base64.RawStdEncoding.EncodeToString(raw)
}

// errConnClosed marks a stream ended because its connection is gone.
var errConnClosed = errors.New("h2grpc: connection closed")
