package envoy

import (
	"math/rand/v2"
	"time"
)

// Backoff paces Envoy restarts: exponential from Initial up to Max, with
// random jitter so a fleet of crashing pods does not restart in lockstep,
// and reset once Envoy has stayed up for ResetAfter.
type Backoff struct {
	// Initial is the first delay. Default 1s.
	Initial time.Duration
	// Max caps the delay. Default 30s.
	Max time.Duration
	// Jitter is the fraction (0..1) of each delay that is randomised. Default 0.2.
	Jitter float64
	// ResetAfter is the uptime after which the next crash starts from
	// Initial again. Default 60s.
	ResetAfter time.Duration
}

// DefaultBackoff returns the restart pacing used unless configured.
func DefaultBackoff() Backoff {
	return Backoff{Initial: time.Second, Max: 30 * time.Second, Jitter: 0.2, ResetAfter: time.Minute}
}

// delay returns the wait before restart number attempt (0-based).
func (b Backoff) delay(attempt int) time.Duration {
	d := b.Initial
	for i := 0; i < attempt && d < b.Max; i++ {
		d *= 2
	}
	if d > b.Max {
		d = b.Max
	}
	if b.Jitter > 0 && d > 0 {
		// Jitter only shortens the delay, so Max stays a true cap.
		d -= time.Duration(rand.Float64() * b.Jitter * float64(d))
	}
	return d
}
