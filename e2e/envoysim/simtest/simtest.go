// Package simtest runs envoysim, the Envoy double, as a separate process
// for end-to-end tests: it writes a bootstrap, starts the binary (inside a
// network namespace and as the proxy's uid 1337 when asked), talks to its
// admin API over a unix socket (reachable from any namespace), and stops
// it when the test ends.
package simtest

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// ProxyUID is the uid and gid Istio runs Envoy as; iptables exempts it
// from capture.
const ProxyUID = 1337

// Options say how to run envoysim.
type Options struct {
	// Netns runs envoysim inside this namespace (nil: the test's own).
	Netns *testenv.Netns
	// AsProxyUID runs envoysim as uid and gid 1337.
	AsProxyUID bool
	// Env is added to the environment (ENVOYSIM_* hooks).
	Env []string
	// Args are added to the command line (-c, --admin-address-path and
	// --drain-time-s 1 are set already).
	Args []string
	// Dir is the working directory (relative pipe paths resolve there);
	// default a fresh SharedDir.
	Dir string
}

// Sim is a running envoysim.
type Sim struct {
	// AdminSocket is the admin API's unix socket.
	AdminSocket string
	client      *http.Client
	cmd         *exec.Cmd
	stdout      *testenv.Buffer
	stderr      *testenv.Buffer
	done        chan struct{}
	exitErr     error
}

// SharedDir returns a temporary directory that uid 1337 can use (mode
// 0777, removed after the test): the per-test temp dirs are private to
// root. The path is short enough for unix socket names.
func SharedDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "esim")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chmod(d, 0o777); err != nil {
		t.Fatal(err)
	}
	return d
}

// Binary builds envoysim once per test process and returns a copy every
// user may execute.
func Binary(t testing.TB) string {
	t.Helper()
	bin := testenv.Build(t, "./e2e/envoysim")
	dir := SharedDir(t)
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "envoysim")
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// Start writes bootstrap and starts envoysim; the admin socket is
// AdminSocketName inside the working directory and must match the
// bootstrap (see Bootstrap). It waits until the admin API answers.
func Start(t testing.TB, bootstrap string, o Options) *Sim {
	t.Helper()
	bin := Binary(t)
	dir := o.Dir
	if dir == "" {
		dir = SharedDir(t)
	}
	bs := filepath.Join(dir, "envoy-rev.json")
	if err := os.WriteFile(bs, []byte(bootstrap), 0o644); err != nil {
		t.Fatal(err)
	}
	s := &Sim{AdminSocket: filepath.Join(dir, AdminSocketName), stdout: &testenv.Buffer{}, stderr: &testenv.Buffer{}, done: make(chan struct{})}
	s.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", s.AdminSocket)
		},
	}}
	args := append([]string{"-c", bs, "--drain-time-s", "1"}, o.Args...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Dir = dir
	s.cmd.Env = append(os.Environ(), o.Env...)
	s.cmd.Stdout, s.cmd.Stderr = s.stdout, s.stderr
	if o.AsProxyUID {
		s.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: ProxyUID, Gid: ProxyUID}}
	}
	start := func() error { return s.cmd.Start() }
	var err error
	if o.Netns != nil {
		o.Netns.In(t, func() { err = start() })
	} else {
		err = start()
	}
	if err != nil {
		t.Fatalf("start envoysim: %v", err)
	}
	go func() {
		s.exitErr = s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		s.Stop(t)
		if t.Failed() {
			t.Logf("envoysim stderr:\n%s\nenvoysim stdout:\n%s", s.stderr.String(), s.stdout.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, _, err := s.Get("/ready"); err == nil {
			return s
		}
		select {
		case <-s.done:
			t.Fatalf("envoysim exited: %v\n%s", s.exitErr, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("envoysim admin never answered on %s\n%s", s.AdminSocket, s.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop sends SIGTERM and waits for the exit (SIGKILL after 10 s). It
// returns the exit code.
func (s *Sim) Stop(t testing.TB) int {
	t.Helper()
	select {
	case <-s.done:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.done
			t.Error("envoysim ignored SIGTERM for 10 s")
		}
	}
	var ee *exec.ExitError
	if errors.As(s.exitErr, &ee) {
		return ee.ExitCode()
	}
	return 0
}

// Stdout is the access log so far; Stderr the application log.
func (s *Sim) Stdout() string { return s.stdout.String() }
func (s *Sim) Stderr() string { return s.stderr.String() }

// Get fetches an admin path.
func (s *Sim) Get(path string) (int, string, error) {
	resp, err := s.client.Get("http://envoy" + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// Stats returns the stats matching filter (a regexp) as a map.
func (s *Sim) Stats(t testing.TB, filter string) map[string]uint64 {
	t.Helper()
	code, body, err := s.Get("/stats?format=json&filter=" + urlEscape(filter))
	if err != nil || code != http.StatusOK {
		t.Fatalf("/stats: %d %v %s", code, err, body)
	}
	var out struct {
		Stats []struct {
			Name  string `json:"name"`
			Value uint64 `json:"value"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(body), &out); err != nil {
		t.Fatalf("/stats: %v", err)
	}
	m := map[string]uint64{}
	for _, st := range out.Stats {
		m[st.Name] = st.Value
	}
	return m
}

func urlEscape(s string) string {
	r := strings.NewReplacer("%", "%25", "&", "%26", "+", "%2B", " ", "%20", "#", "%23", "|", "%7C", "?", "%3F")
	return r.Replace(s)
}

// Eventually polls cond every 20 ms until it is true or d passes; then it
// fails the test with what and the envoysim log.
func (s *Sim) Eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		select {
		case <-s.done:
			t.Fatalf("envoysim exited (%v) while waiting for %s", s.exitErr, what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// WaitLive waits for /ready to say LIVE.
func (s *Sim) WaitLive(t testing.TB, d time.Duration) {
	t.Helper()
	s.Eventually(t, d, "LIVE", func() bool {
		code, body, err := s.Get("/ready")
		return err == nil && code == http.StatusOK && strings.TrimSpace(body) == "LIVE"
	})
}

// State returns /ready's body.
func (s *Sim) State(t testing.TB) string {
	t.Helper()
	_, body, err := s.Get("/ready")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(body)
}

// Certs returns /certs.
func (s *Sim) Certs(t testing.TB) *adminv3.Certificates {
	t.Helper()
	code, body, err := s.Get("/certs")
	if err != nil || code != http.StatusOK {
		t.Fatalf("/certs: %d %v", code, err)
	}
	out := &adminv3.Certificates{}
	if err := protojson.Unmarshal([]byte(body), out); err != nil {
		t.Fatalf("/certs: %v\n%s", err, body)
	}
	return out
}
