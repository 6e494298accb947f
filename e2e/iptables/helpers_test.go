package iptables_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
	"github.com/outrigger-mesh/outrigger/internal/netstate"
	"github.com/outrigger-mesh/outrigger/iptables"
)

// helperEnv switches the test binary into a helper process (see TestMain):
// a client that must run as another uid.
const helperEnv = "OUTRIGGER_E2E_IPTABLES_HELPER"

// injector is the istio-init command line of an injected sidecar.
var injector = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

func TestMain(m *testing.M) {
	if addr := os.Getenv(helperEnv); addr != "" {
		// Dial addr and write "ok" or the error: runs as uid 1337 in the
		// pod's namespace, inherited from the thread that started it.
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Fprint(c, "from-1337")
		c.Close()
		fmt.Println("ok")
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// listen opens a TCP listener in ns (transparent: IP_TRANSPARENT, for
// TPROXY).
func listen(t testing.TB, ns *testenv.Netns, addr string, transparent bool) *net.TCPListener {
	t.Helper()
	var ln net.Listener
	var err error
	ns.In(t, func() {
		lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				if transparent {
					level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
					if strings.HasSuffix(network, "6") {
						level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
					}
					serr = unix.SetsockoptInt(int(fd), level, opt, 1)
				}
			})
			if err != nil {
				return err
			}
			return serr
		}}
		ln, err = lc.Listen(t.Context(), "tcp", addr)
	})
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// accepted is what a listener saw of one connection.
type accepted struct {
	Local, Remote, OrigDst netip.AddrPort
	Payload                string
}

// acceptOne accepts a connection within a second; ok is false on timeout.
func acceptOne(t testing.TB, ln *net.TCPListener, origDst bool) (accepted, bool) {
	t.Helper()
	_ = ln.SetDeadline(time.Now().Add(time.Second))
	c, err := ln.AcceptTCP()
	if err != nil {
		return accepted{}, false
	}
	defer c.Close()
	a := accepted{
		Local:  netip.MustParseAddrPort(c.LocalAddr().String()),
		Remote: netip.MustParseAddrPort(c.RemoteAddr().String()),
	}
	if origDst {
		if a.OrigDst, err = iptables.OriginalDst(c); err != nil {
			t.Errorf("SO_ORIGINAL_DST: %v", err)
		}
	}
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64)
	n, _ := c.Read(buf)
	a.Payload = string(buf[:n])
	return a, true
}

// dial connects from ns to addr and sends payload. A refused connection is
// not an error: what matters is which listener saw the SYN.
func dial(t testing.TB, ns *testenv.Netns, addr, payload string) {
	t.Helper()
	ns.In(t, func() {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return
		}
		fmt.Fprint(c, payload)
		c.Close()
	})
}

// dialAs1337 dials from ns as the proxy's uid and gid, through a helper
// process.
func dialAs1337(t testing.TB, ns *testenv.Netns, addr string) string {
	t.Helper()
	var out []byte
	ns.In(t, func() {
		cmd := exec.Command("/proc/self/exe", "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"="+addr)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
		out, _ = cmd.CombinedOutput()
	})
	return strings.TrimSpace(string(out))
}

// outrigger runs "outrigger istio-iptables args" inside ns with env.
func outrigger(t testing.TB, ns *testenv.Netns, env []string, args ...string) (string, error) {
	t.Helper()
	cmd := ns.Command(testenv.Outrigger(t), append([]string{"istio-iptables"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mustOutrigger(t testing.TB, ns *testenv.Netns, env []string, args ...string) string {
	t.Helper()
	out, err := outrigger(t, ns, env, args...)
	if err != nil {
		t.Fatalf("outrigger istio-iptables %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// resolvConf makes "ip netns exec" show the namespace a resolv.conf of its
// own (it bind-mounts /etc/netns/<name>/resolv.conf).
func resolvConf(t testing.TB, ns *testenv.Netns, servers ...string) {
	t.Helper()
	dir := filepath.Join("/etc/netns", ns.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	var b strings.Builder
	for _, s := range servers {
		b.WriteString("nameserver " + s + "\n")
	}
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// snapshot is everything an istio-iptables run may touch in ns, as text
// (see netstate).
func snapshot(t testing.TB, ns *testenv.Netns) string {
	t.Helper()
	return netstate.Snapshot(ns.RunErr)
}
