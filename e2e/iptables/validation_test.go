package iptables_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// runAs1337 runs "outrigger istio-iptables args" in ns as the proxy's uid,
// as Istio's istio-validation init container runs, and returns its exit
// code and output.
func runAs1337(t *testing.T, ns *testenv.Netns, args ...string) (int, string) {
	t.Helper()
	bin := worldExecutable(t, testenv.Outrigger(t))
	var out []byte
	var err error
	ns.In(t, func() {
		cmd := exec.Command(bin, append([]string{"istio-iptables"}, args...)...)
		cmd.Env = os.Environ()
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
		out, err = cmd.CombinedOutput()
	})
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("run as 1337: %v", err)
	return -1, ""
}

// TestRunValidation: with the rules applied, --run-validation
// --skip-rule-apply proves the redirect and exits 0; without them it exits
// 126 after --probe-timeout.
func TestRunValidation(t *testing.T) {
	requireTools(t)
	p := testenv.NewPair(t, "va", false)
	validate := append(append([]string{}, injector...), "--run-validation", "--skip-rule-apply", "--probe-timeout", "2s")

	code, out := runAs1337(t, p.Pod, validate...)
	if code != 126 || !strings.Contains(out, "validation") {
		t.Errorf("validation without rules: exit %d, want 126\n%s", code, out)
	}

	mustOutrigger(t, p.Pod, nil, injector...)
	code, out = runAs1337(t, p.Pod, validate...)
	if code != 0 || !strings.Contains(out, "validation passed") {
		t.Errorf("validation with rules: exit %d, want 0\n%s", code, out)
	}
}

// worldExecutable copies bin where uid 1337 can run it (the build
// directory is private to root).
func worldExecutable(t *testing.T, bin string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "outrigger-1337-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "outrigger")
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestWithoutPrivilegeFailsClearly: istio-init without root and NET_ADMIN
// (a pod security policy, a wrong securityContext) cannot read or change
// the rules. Both the apply and the cleanup must exit 1 with an error that
// says what is missing; a cleanup that could read nothing must not report
// success.
func TestWithoutPrivilegeFailsClearly(t *testing.T) {
	requireTools(t)
	p := testenv.NewPair(t, "np", false)
	for _, args := range [][]string{injector, append(append([]string{}, injector...), "--cleanup-only")} {
		code, out := runAs1337(t, p.Pod, args...)
		if code != 1 || !strings.Contains(out, "NET_ADMIN") {
			t.Errorf("%v as uid 1337: exit %d, want 1 with an error naming NET_ADMIN\n%s", args, code, out)
		}
	}
}
