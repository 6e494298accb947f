package sds

import (
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

// TestFileSecretsWithdrawnAtExpiry: a file key and chain leaves the store at
// its NotAfter even though the files never change; a reload with a fresh
// certificate moves the deadline; a new request for an expired file-cert is
// refused naming the file.
func TestFileSecretsWithdrawnAtExpiry(t *testing.T) {
	// The inotify watcher is made outside the bubble: its reader goroutine
	// sits in a syscall, which would keep fake time from advancing.
	core, logs := observer.New(zapcore.ErrorLevel)
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	f := newFileWatcher(zap.New(core), newStore(), m, time.Millisecond, "")
	if err := f.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.w.Close() })
	dir := shortDir(t)

	synctest.Test(t, func(t *testing.T) {
		t.Cleanup(f.stopTimers) // inside the bubble: its timers belong to it
		ca, err := testca.New(testca.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defCert, defKey := filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem")
		fc, fk := filepath.Join(dir, "fc.pem"), filepath.Join(dir, "fk.pem")
		fileCert := FileCertPrefix + fc + "~" + fk
		writePairTTL(t, ca, defCert, defKey, time.Hour)
		writePairTTL(t, ca, fc, fk, 2*time.Hour)
		if err := f.add(&fileResource{name: WorkloadResource, certPath: defCert, keyPath: defKey}, false); err != nil {
			t.Fatal(err)
		}
		if _, err := f.ensure(fileCert); err != nil {
			t.Fatal(err)
		}
		served := func(name string) bool {
			_, ok := f.store.get(name)
			return ok
		}

		time.Sleep(time.Hour - time.Second)
		synctest.Wait()
		if !served(WorkloadResource) || !served(fileCert) {
			t.Fatal("a valid file certificate was withdrawn before its NotAfter")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if served(WorkloadResource) {
			t.Fatal("default still served after its file certificate expired")
		}
		if !served(fileCert) {
			t.Fatal("file-cert withdrawn with default; it expires an hour later")
		}
		if s := m.secondsToExpiry(); s != 0 {
			t.Errorf("expiry metric %v after withdrawal, want 0", s)
		}
		if n := metricValue(t, reg, "istio_agent_num_file_secret_failures_total"); n != 1 {
			t.Errorf("file secret failures = %v after one expiry, want 1", n)
		}
		expired := logs.FilterMessageSnippet("expired").All()
		if len(expired) != 1 {
			t.Fatalf("logged %d expiry errors, want 1: %v", len(expired), logs.All())
		}
		if fields := expired[0].ContextMap(); fields["cert"] != defCert || fields["not_after"] == nil {
			t.Errorf("expiry log fields %v, want cert=%s and not_after", fields, defCert)
		}

		// Fresh file-cert files 30 minutes before the old one expires: the
		// timer moves to the new NotAfter (3h from now).
		time.Sleep(30 * time.Minute)
		writePairTTL(t, ca, fc, fk, 3*time.Hour)
		f.reloadAll()
		time.Sleep(time.Hour)
		synctest.Wait()
		if !served(fileCert) {
			t.Fatal("reloaded file-cert withdrawn at the old certificate's NotAfter")
		}
		time.Sleep(2*time.Hour + time.Second)
		synctest.Wait()
		if served(fileCert) {
			t.Fatal("file-cert still served after the reloaded certificate expired")
		}
		// A new request for it is refused, naming the file.
		_, err = f.ensure(fileCert)
		if err == nil || !strings.Contains(err.Error(), fc) || !strings.Contains(err.Error(), "expired") {
			t.Errorf("ensure after expiry: %v, want an error naming %s and the expiry", err, fc)
		}

		// New files bring default back.
		writePairTTL(t, ca, defCert, defKey, time.Hour)
		f.reloadAll()
		if !served(WorkloadResource) {
			t.Fatal("default not served again after fresh files")
		}
		if s := m.secondsToExpiry(); s < 3500 {
			t.Errorf("expiry metric %v after fresh files, want about an hour", s)
		}
	})
}
