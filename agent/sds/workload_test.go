package sds

import (
	"context"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/outrigger-mesh/outrigger/agent/caclient"
	"github.com/outrigger-mesh/outrigger/agent/certs"
	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

func TestRotationDelay(t *testing.T) {
	issued := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	expiry := issued.Add(24 * time.Hour)
	tests := []struct {
		name          string
		now           time.Time
		ratio, jitter float64
		rnd           float64
		want          time.Duration
	}{
		{"half, no jitter", issued, 0.5, 0, 0.3, 12 * time.Hour},
		{"jitter low end", issued, 0.5, 0.01, 0, 12*time.Hour + time.Duration(0.01*float64(24*time.Hour))},
		{"jitter high end", issued, 0.5, 0.01, 1, 12*time.Hour - time.Duration(0.01*float64(24*time.Hour))},
		{"later now", issued.Add(time.Hour), 0.5, 0, 0.5, 11 * time.Hour},
		{"past rotation point", issued.Add(20 * time.Hour), 0.5, 0, 0.5, 0},
		{"ratio clamps at 1", issued, 0.999, 0.5, 1, 0},
		{"ratio clamps at 0", issued, 0.001, 0.5, 0, 24 * time.Hour},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := rotationDelay(tc.now, issued, expiry, tc.ratio, tc.jitter, func() float64 { return tc.rnd })
			if d := got - tc.want; d > time.Millisecond || d < -time.Millisecond {
				t.Errorf("rotationDelay = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	mid := func() float64 { return 0.5 }
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 10 * time.Second, 10 * time.Second} {
		if got := backoff(i, time.Second, 10*time.Second, mid); got != want {
			t.Errorf("backoff(%d) = %s, want %s", i, got, want)
		}
	}
	if lo, hi := backoff(0, time.Second, time.Minute, func() float64 { return 0 }), backoff(0, time.Second, time.Minute, func() float64 { return 0.9999 }); lo != 800*time.Millisecond || hi < 1199*time.Millisecond {
		t.Errorf("jitter range %s..%s, want 0.8s..1.2s", lo, hi)
	}
}

// directCA calls the test CA in-process (no network, so synctest's clock
// applies) and records when it was asked.
type directCA struct {
	ca *testca.CA
	mu sync.Mutex
	at []time.Time
}

func (d *directCA) Sign(ctx context.Context, csr []byte, ttl time.Duration) ([]byte, []byte, error) {
	d.mu.Lock()
	d.at = append(d.at, time.Now())
	d.mu.Unlock()
	resp, err := d.ca.CreateCertificate(ctx, &caclient.Request{CSR: string(csr), ValidityDuration: int64(ttl / time.Second)})
	if err != nil {
		return nil, nil, err
	}
	return caclient.SplitResponse(resp)
}

func (d *directCA) calls() []time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]time.Time(nil), d.at...)
}

func newTestWorkload(t *testing.T, cfg Config) (*workload, *directCA, *testca.CA) {
	t.Helper()
	ca, err := testca.New(testca.Config{})
	if err != nil {
		t.Fatal(err)
	}
	d := &directCA{ca: ca}
	cfg.CA = d
	cfg.Namespace, cfg.ServiceAccount = "ns", "sa"
	cfg.Key = certs.KeyOptions{ECCSignatureAlgorithm: "ECDSA"}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	m, _ := newMetrics(nil)
	w := &workload{cfg: cfg, log: zaptest.NewLogger(t), store: newStore(), metrics: m, rnd: defaultRand,
		id: certs.SPIFFEID(cfg.TrustDomain, "ns", "sa")}
	return w, d, ca
}

func runWorkload(t *testing.T, w *workload) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = w.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func TestWorkloadRenewsAtGraceRatio(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w, d, _ := newTestWorkload(t, Config{SecretTTL: 24 * time.Hour})
		runWorkload(t, w)
		synctest.Wait()
		first, ok := w.store.get(WorkloadResource)
		if !ok {
			t.Fatal("no default secret after start")
		}
		if _, ok := w.store.get(RootResource); !ok {
			t.Fatal("no ROOTCA secret after start")
		}
		// 0.5 ± 0.01 of 24h left: renewal between 11.76h and 12.24h.
		time.Sleep(11*time.Hour + 45*time.Minute)
		synctest.Wait()
		if n := len(d.calls()); n != 1 {
			t.Fatalf("%d CSRs before 11.76h, want 1", n)
		}
		time.Sleep(30 * time.Minute)
		synctest.Wait()
		if n := len(d.calls()); n != 2 {
			t.Fatalf("%d CSRs by 12.25h, want 2", n)
		}
		second, _ := w.store.get(WorkloadResource)
		if second.version == first.version {
			t.Error("renewal did not publish a new version")
		}
		if certs.SameBytes(second.secret.GetTlsCertificate().GetPrivateKey().GetInlineBytes(), first.secret.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) {
			t.Error("renewal reused the private key")
		}
	})
}

func TestWorkloadRetriesWithBackoffThenRecovers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w, d, ca := newTestWorkload(t, Config{InitialBackoff: time.Second, MaxBackoff: 8 * time.Second})
		ca.SetFault(testca.FaultUnavailable)
		runWorkload(t, w)
		time.Sleep(40 * time.Second)
		synctest.Wait()
		at := d.calls()
		if len(at) < 5 {
			t.Fatalf("only %d attempts in 40s", len(at))
		}
		for i := 1; i < len(at); i++ {
			base := min(time.Second<<(i-1), 8*time.Second)
			gap := at[i].Sub(at[i-1])
			if gap < base*8/10 || gap > base*12/10 {
				t.Errorf("wait before attempt %d = %s, want %s ±20%%", i+1, gap, base)
			}
		}
		if _, ok := w.store.get(WorkloadResource); ok {
			t.Fatal("a secret was published while the CA failed")
		}
		ca.SetFault(testca.FaultNone)
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if _, ok := w.store.get(WorkloadResource); !ok {
			t.Fatal("no secret after the CA recovered")
		}
	})
}

func TestWorkloadWithdrawsExpiredCertificate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w, _, ca := newTestWorkload(t, Config{SecretTTL: time.Hour, MaxBackoff: 5 * time.Minute})
		runWorkload(t, w)
		synctest.Wait()
		ca.SetFault(testca.FaultUnavailable)
		time.Sleep(59 * time.Minute)
		synctest.Wait()
		if _, ok := w.store.get(WorkloadResource); !ok {
			t.Fatal("still-valid certificate withdrawn before expiry")
		}
		if s := w.metrics.secondsToExpiry(); s <= 0 || s > 60 {
			t.Errorf("expiry metric %v, want under a minute", s)
		}
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		if _, ok := w.store.get(WorkloadResource); ok {
			t.Fatal("expired certificate still served")
		}
		if _, ok := w.store.get(RootResource); !ok {
			t.Error("ROOTCA withdrawn with the leaf; roots stay valid")
		}
		if s := w.metrics.secondsToExpiry(); s != 0 {
			t.Errorf("expiry metric %v after withdrawal, want 0", s)
		}
		ca.SetFault(testca.FaultNone)
		time.Sleep(6 * time.Minute)
		synctest.Wait()
		if _, ok := w.store.get(WorkloadResource); !ok {
			t.Fatal("no certificate after the CA came back")
		}
	})
}

func TestWorkloadRefusesBadCertificates(t *testing.T) {
	for _, f := range []testca.Fault{testca.FaultWrongKey, testca.FaultWrongIdentity, testca.FaultExpired, testca.FaultUntrustedChain} {
		synctest.Test(t, func(t *testing.T) {
			w, d, ca := newTestWorkload(t, Config{})
			ca.SetFault(f)
			runWorkload(t, w)
			time.Sleep(5 * time.Second)
			synctest.Wait()
			if _, ok := w.store.get(WorkloadResource); ok {
				t.Fatalf("fault %d: bad certificate served", f)
			}
			if len(d.calls()) < 2 {
				t.Errorf("fault %d: no retry after a refused certificate", f)
			}
		})
	}
}
