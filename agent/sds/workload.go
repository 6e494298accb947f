package sds

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net/url"
	"time"

	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/agent/certs"
)

// issued is one workload certificate from the CA.
type issued struct {
	chainPEM, keyPEM, rootsPEM []byte
	issuedAt, notAfter         time.Time
}

// workload keeps a valid CA-issued certificate in the store under "default"
// (and the CA's roots under "ROOTCA"): it asks at start, renews before expiry,
// retries with backoff, and withdraws a certificate that expired.
type workload struct {
	cfg     Config
	log     *zap.Logger
	store   *store
	metrics *metrics
	id      *url.URL // spiffe://<trust domain>/ns/<ns>/sa/<sa>
	rnd     func() float64
}

func (w *workload) run(ctx context.Context) error {
	var (
		cur       *issued
		withdrawn bool
		failures  int
	)
	for {
		next, err := w.issue(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var wait time.Duration
		if err != nil {
			wait = backoff(failures, w.cfg.InitialBackoff, w.cfg.MaxBackoff, w.rnd)
			failures++
			if cur != nil {
				left := time.Until(cur.notAfter)
				if left <= 0 && !withdrawn {
					// Never hand out an expired certificate. Envoys that
					// hold it keep it (SotW SDS cannot take it back); new
					// requests wait for a fresh one.
					w.log.Error("workload certificate expired and the CA gives no new one: no longer serving it",
						zap.Time("expired_at", cur.notAfter), zap.Error(err))
					w.store.remove(WorkloadResource)
					w.metrics.setExpiry(time.Time{})
					withdrawn = true
				} else if left > 0 && left < wait {
					wait = left
				}
			}
			w.log.Warn("workload certificate request failed; retrying",
				zap.Stringer("identity", w.id), zap.Int("attempt", failures), zap.Duration("retry_in", wait), zap.Error(err))
		} else {
			failures, withdrawn = 0, false
			w.publish(cur, next)
			cur = next
			wait = rotationDelay(time.Now(), cur.issuedAt, cur.notAfter, w.cfg.GracePeriodRatio, w.cfg.GracePeriodRatioJitter, w.rnd)
			w.log.Info("workload certificate ready",
				zap.Stringer("identity", w.id), zap.Time("expires", cur.notAfter), zap.Duration("renew_in", wait))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

func (w *workload) publish(prev, next *issued) {
	w.store.set(WorkloadResource, keyCertSecret(WorkloadResource, next.chainPEM, next.keyPEM), next.notAfter)
	if prev == nil || !bytes.Equal(prev.rootsPEM, next.rootsPEM) {
		w.store.set(RootResource, rootSecret(RootResource, next.rootsPEM), time.Time{})
	}
	w.metrics.setExpiry(next.notAfter)
}

// issue makes a key and CSR, has the CA sign it, and checks the answer: the
// leaf must match our key and identity, be valid now and chain to the roots
// the CA sent.
func (w *workload) issue(ctx context.Context) (*issued, error) {
	key, err := certs.GenerateKey(w.cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("generate workload key: %w", err)
	}
	keyPEM, err := certs.MarshalKey(key, w.cfg.Key.PKCS8)
	if err != nil {
		return nil, err
	}
	csr, err := certs.CreateCSR(key, w.id)
	if err != nil {
		return nil, err
	}
	w.metrics.csrRequests.Inc()
	start := time.Now()
	chainPEM, rootsPEM, err := w.cfg.CA.Sign(ctx, csr, w.cfg.SecretTTL)
	w.metrics.csrLatencyMs.Add(float64(time.Since(start)) / float64(time.Millisecond))
	if err != nil {
		w.metrics.csrFailures.Inc()
		return nil, fmt.Errorf("CA sign: %w", err)
	}
	now := time.Now()
	roots, _, err := certs.ParseRoots(rootsPEM)
	if err != nil {
		w.metrics.csrFailures.Inc()
		return nil, fmt.Errorf("CA response roots: %w", err)
	}
	v, err := certs.VerifyChain(chainPEM, certs.Check{Key: key, Roots: roots, SPIFFEID: w.id.String(), Now: now})
	if err != nil {
		w.metrics.csrFailures.Inc()
		return nil, fmt.Errorf("refusing the certificate from the CA: %w", err)
	}
	return &issued{chainPEM: chainPEM, keyPEM: keyPEM, rootsPEM: rootsPEM, issuedAt: now, notAfter: v.NotAfter}, nil
}

// rotationDelay is Istio's rule: renew when (ratio ± jitter) of the lifetime
// is left, the jitter drawn uniformly so a fleet does not renew in step.
// rnd returns a number in [0,1).
func rotationDelay(now, issuedAt, notAfter time.Time, ratio, jitter float64, rnd func() float64) time.Duration {
	r := ratio + jitter*(2*rnd()-1)
	r = min(max(r, 0), 1)
	grace := time.Duration(r * float64(notAfter.Sub(issuedAt)))
	return max(notAfter.Add(-grace).Sub(now), 0)
}

// backoff is the wait before retry number attempt (0-based): doubling from
// initial up to max, then ±20% jitter.
func backoff(attempt int, initial, maxWait time.Duration, rnd func() float64) time.Duration {
	d := initial
	for range attempt {
		d *= 2
		if d >= maxWait {
			d = maxWait
			break
		}
	}
	return time.Duration(float64(d) * (0.8 + 0.4*rnd()))
}

// defaultRand is the jitter source outside tests.
func defaultRand() float64 { return rand.Float64() }
