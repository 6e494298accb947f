package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
)

// forwarder sends queries to the pod's resolvers: one after the other in
// random order, or all at once, and over TCP again when a UDP answer comes
// back truncated.
type forwarder struct {
	ups      []*upstream
	parallel bool
	log      *zap.Logger
	wg       sync.WaitGroup // parallel exchanges still finishing
}

var errNoUpstreams = errors.New("no upstream resolvers (resolv.conf has no nameserver)")

func newForwarder(addrs []netip.AddrPort, timeout time.Duration, parallel bool, log *zap.Logger) *forwarder {
	f := &forwarder{parallel: parallel, log: log}
	for _, a := range addrs {
		f.ups = append(f.ups, newUpstream(a, timeout))
	}
	return f
}

func (f *forwarder) close() {
	f.wg.Wait()
	for _, u := range f.ups {
		u.close()
	}
}

// forward returns the first good answer. When none is good it returns an
// error, with the last SERVFAIL or REFUSED answer seen (if any) so that it
// can be relayed when nothing better exists.
func (f *forwarder) forward(ctx context.Context, req *dns.Msg) (*dns.Msg, error) {
	if len(f.ups) == 0 {
		return nil, errNoUpstreams
	}
	msg, err := req.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack upstream query: %w", err)
	}
	if f.parallel && len(f.ups) > 1 {
		return f.forwardParallel(ctx, msg)
	}
	order := rand.Perm(len(f.ups))
	var bad *dns.Msg
	var errs []error
	for _, i := range order {
		resp, err := f.exchange(ctx, f.ups[i], msg)
		if err == nil {
			return resp, nil
		}
		if resp != nil {
			bad = resp
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return bad, errors.Join(errs...)
}

type result struct {
	resp *dns.Msg
	err  error
}

func (f *forwarder) forwardParallel(ctx context.Context, msg []byte) (*dns.Msg, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan result, len(f.ups))
	for _, u := range f.ups {
		f.wg.Go(func() {
			resp, err := f.exchange(ctx, u, msg)
			results <- result{resp, err}
		})
	}
	var bad *dns.Msg
	var errs []error
	for range f.ups {
		r := <-results
		if r.err == nil {
			return r.resp, nil // the rest end with ctx; results is buffered
		}
		if r.resp != nil {
			bad = r.resp
		}
		errs = append(errs, r.err)
	}
	return bad, errors.Join(errs...)
}

// exchange asks one upstream. SERVFAIL and REFUSED count as failures (with
// the answer returned). A truncated UDP answer is retried over TCP; if that
// fails the truncated answer is still a good answer: the client sees TC and
// can retry over TCP itself.
func (f *forwarder) exchange(ctx context.Context, u *upstream, msg []byte) (*dns.Msg, error) {
	raw, err := u.exchangeUDP(ctx, append([]byte(nil), msg...))
	if err != nil {
		return nil, err
	}
	if len(raw) > 2 && raw[2]&0x02 != 0 { // TC
		if rawTCP, err := u.exchangeTCP(ctx, append([]byte(nil), msg...)); err == nil {
			raw = rawTCP
		} else {
			f.log.Debug("TCP retry of a truncated answer failed", zap.Stringer("upstream", u.addr), zap.Error(err))
		}
	}
	resp := new(dns.Msg)
	if err := resp.Unpack(raw); err != nil {
		if resp.Truncated {
			// Cut mid-record by the upstream: keep what parsed.
			return resp, nil
		}
		return nil, fmt.Errorf("%s: unpack answer: %w", u.addr, err)
	}
	switch resp.Rcode {
	case dns.RcodeServerFailure, dns.RcodeRefused:
		return resp, fmt.Errorf("%s: %s", u.addr, dns.RcodeToString[resp.Rcode])
	}
	return resp, nil
}
