package envoy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
)

// The test binary doubles as a fake Envoy (a process that records how it
// was started and exits as told) and as a fake agent (for the parent-death
// test); the env var selects the role.
func TestMain(m *testing.M) {
	switch os.Getenv("ENVOY_TEST_ROLE") {
	case "envoy":
		os.Exit(fakeEnvoy())
	case "agent":
		os.Exit(fakeAgent())
	}
	goleak.VerifyTestMain(m)
}

// fakeEnvoy appends "pid args..." to $FAKE_RECORD, optionally starts a child
// in its process group and records "child <pid>", then exits with
// $FAKE_EXIT_CODE after $FAKE_EXIT_AFTER, or waits for a signal. With
// $FAKE_IGNORE_TERM it ignores SIGTERM. $FAKE_KILL_SELF ends it by SIGKILL.
func fakeEnvoy() int {
	if os.Getenv("FAKE_IGNORE_TERM") != "" {
		signal.Ignore(syscall.SIGTERM)
	}
	term := make(chan os.Signal, 1)
	if os.Getenv("FAKE_IGNORE_TERM") == "" {
		signal.Notify(term, syscall.SIGTERM)
	}
	rec, err := os.OpenFile(os.Getenv("FAKE_RECORD"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return 99
	}
	fmt.Fprintf(rec, "%d %v\n", os.Getpid(), os.Args[1:])
	if os.Getenv("FAKE_CHILD") != "" {
		c := exec.Command("sleep", "300")
		if err := c.Start(); err != nil {
			return 98
		}
		fmt.Fprintf(rec, "child %d\n", c.Process.Pid)
	}
	rec.Close()
	if os.Getenv("FAKE_KILL_SELF") != "" {
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
	// Without a deadline the fake waits "forever": an hour, as a timer, so
	// the runtime never mistakes a fake that ignores SIGTERM for a deadlock.
	exitAfter := time.After(time.Hour)
	if d, err := time.ParseDuration(os.Getenv("FAKE_EXIT_AFTER")); err == nil {
		exitAfter = time.After(d)
	}
	code, _ := strconv.Atoi(os.Getenv("FAKE_EXIT_CODE"))
	select {
	case <-exitAfter:
		return code
	case <-term:
		return 0
	}
}

// fakeAgent runs the supervisor on a fake Envoy until it is killed.
func fakeAgent() int {
	cfg := DefaultConfig()
	cfg.BinaryPath = os.Args[0]
	cfg.BootstrapPath = "unused.json"
	cfg.Admin = netip.MustParseAddrPort("127.0.0.1:1")
	cfg.Env = append(os.Environ(), "ENVOY_TEST_ROLE=envoy")
	p, err := New(cfg, zap.NewNop())
	if err != nil {
		return 97
	}
	if err := p.Run(context.Background()); err != nil {
		return 96
	}
	return 0
}
