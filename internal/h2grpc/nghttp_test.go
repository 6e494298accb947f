package h2grpc

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var (
	nghttpData   = regexp.MustCompile(`recv DATA frame <length=(\d+), flags=0x[0-9a-f]+, stream_id=(\d+)>`)
	nghttpStatus = regexp.MustCompile(`recv \(stream_id=(\d+)\) grpc-status: (\d+)`)
	nghttpError  = regexp.MustCompile(`(send|recv) RST_STREAM|recv GOAWAY|error_code=(?:[A-Z_]+)\(0x0*[1-9a-f]`)
)

// TestServerAgainstNghttp makes gRPC-shaped calls with nghttp (nghttp2's
// own client) over TCP, reaching what curl does not: small stream and
// connection windows (-w/-W bits) that nghttp2 refills with its own
// WINDOW_UPDATE policy, padded HEADERS and DATA (-b), the PRIORITY frames
// and dependencies on idle streams nghttp2 sends by default (or none with
// --no-dep), a request with content-length, SETTINGS_HEADER_TABLE_SIZE=0
// (nghttp2 then requires our encoder's table size update), and several
// streams sharing the connection window. It reads nghttp -v's frame log:
// every response's DATA must add up, every stream must end with
// grpc-status, and nothing may be reset or go away with an error.
func TestServerAgainstNghttp(t *testing.T) {
	requireTool(t, "nghttp", "nghttp2")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerConfig{Handle: unaryShaped})
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	defer func() {
		s.Stop()
		<-served
	}()
	base := "http://" + l.Addr().String()
	tests := []struct {
		name    string
		args    []string
		size    int
		paths   []string
		status  string
		padding bool
	}{
		{name: "8 MB through 64 KiB windows, padded", args: []string{"-w", "16", "-W", "16", "-b", "255"}, size: 8 << 20, paths: []string{"/pkg.Svc/Method"}, status: "0", padding: true},
		{name: "1 MB through 16 KiB windows, no priorities", args: []string{"-w", "14", "-W", "14", "--no-dep"}, size: 1 << 20, paths: []string{"/pkg.Svc/Method"}, status: "0"},
		{name: "error after data through 16 KiB windows", args: []string{"-w", "14", "-W", "15"}, size: 40000, paths: []string{"/pkg.Svc/Fail"}, status: "5"},
		{name: "header table size 0", args: []string{"-c", "0"}, size: 1000, paths: []string{"/pkg.Svc/Method", "/pkg.Svc/Method?2", "/pkg.Svc/Deny"}, status: ""},
		{name: "four streams share a 64 KiB connection window", args: []string{"-w", "16", "-W", "16", "-m", "1"}, size: 1 << 20,
			paths: []string{"/pkg.Svc/Method", "/pkg.Svc/Method?b", "/pkg.Svc/Method?c", "/pkg.Svc/Method?d"}, status: "0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := filepath.Join(t.TempDir(), "req")
			if err := os.WriteFile(req, sizeRequest(tt.size), 0o600); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"-v", "-n", "-t", "20", "-d", req, "-H", "content-type: application/grpc", "-H", "te: trailers"}, tt.args...)
			for _, p := range tt.paths {
				args = append(args, base+p)
			}
			out, err := exec.Command("nghttp", args...).CombinedOutput()
			log := string(out)
			if err != nil {
				t.Fatalf("nghttp: %v\n%s", err, tail(log))
			}
			if m := nghttpError.FindString(log); m != "" {
				t.Fatalf("nghttp log has %q:\n%s", m, tail(log))
			}
			got := make(map[string]int)
			for _, m := range nghttpData.FindAllStringSubmatch(log, -1) {
				n, _ := strconv.Atoi(m[1])
				got[m[2]] += n
			}
			codes := make(map[string]string)
			for _, m := range nghttpStatus.FindAllStringSubmatch(log, -1) {
				codes[m[1]] = m[2]
			}
			if len(codes) != len(tt.paths) {
				t.Fatalf("grpc-status on %d streams, want %d:\n%s", len(codes), len(tt.paths), tail(log))
			}
			for id, c := range codes {
				want, wantBody := tt.status, 5+tt.size
				if tt.status == "" { // per path: Deny is a trailers-only PermissionDenied
					want = "0"
				}
				if c == "7" && tt.status == "" {
					want, wantBody = "7", 0
				}
				if c != want || got[id] != wantBody {
					t.Errorf("stream %s: grpc-status %s, %d body bytes; want %s, %d", id, c, got[id], want, wantBody)
				}
			}
			if tt.padding && !strings.Contains(log, "PADDED") {
				t.Error("nghttp sent no padded frame")
			}
		})
	}
}

// tail is the end of a long log, for failure messages.
func tail(s string) string {
	if len(s) > 4000 {
		return "...\n" + s[len(s)-4000:]
	}
	return s
}
