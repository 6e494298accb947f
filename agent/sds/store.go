package sds

import (
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// store holds the secrets ready for Envoy, each with a version that changes
// whenever its content does. Streams subscribe and are poked on any change;
// they compare versions to find what to send.
type store struct {
	mu      sync.Mutex
	entries map[string]storeEntry
	version uint64
	subs    map[chan struct{}]struct{}
}

type storeEntry struct {
	secret   *tlsv3.Secret
	version  uint64
	notAfter time.Time // zero: does not expire
}

func newStore() *store {
	return &store{entries: map[string]storeEntry{}, subs: map[chan struct{}]struct{}{}}
}

// set publishes a secret under name and pokes every subscriber. A secret
// with a notAfter is never returned from that instant on, even before its
// owner withdraws it.
func (s *store) set(name string, sec *tlsv3.Secret, notAfter time.Time) {
	s.mu.Lock()
	s.version++
	s.entries[name] = storeEntry{secret: sec, version: s.version, notAfter: notAfter}
	s.notifyLocked()
	s.mu.Unlock()
}

// remove withdraws a secret: streams that subscribe later wait for a new one.
// Envoys that already hold it keep it (SotW SDS has no removal).
func (s *store) remove(name string) {
	s.mu.Lock()
	if _, ok := s.entries[name]; ok {
		delete(s.entries, name)
		s.notifyLocked()
	}
	s.mu.Unlock()
}

func (s *store) get(name string) (storeEntry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[name]
	if ok && !e.notAfter.IsZero() && !time.Now().Before(e.notAfter) {
		return storeEntry{}, false
	}
	return e, ok
}

func (s *store) notifyLocked() {
	for ch := range s.subs {
		select {
		case ch <- struct{}{}:
		default: // a poke is pending already
		}
	}
}

// subscribe returns a channel poked after every change, and a cancel func.
func (s *store) subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	s.mu.Lock()
	s.subs[ch] = struct{}{}
	s.mu.Unlock()
	return ch, func() {
		s.mu.Lock()
		delete(s.subs, ch)
		s.mu.Unlock()
	}
}

func inline(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

func keyCertSecret(name string, chainPEM, keyPEM []byte) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(chainPEM),
			PrivateKey:       inline(keyPEM),
		}},
	}
}

func rootSecret(name string, rootsPEM []byte) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inline(rootsPEM),
		}},
	}
}
