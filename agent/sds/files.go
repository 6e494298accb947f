package sds

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/agent/certs"
)

// fileResource is a secret read from disk: a key and chain, or a bundle of
// roots.
type fileResource struct {
	name              string
	certPath, keyPath string // key and chain; empty for roots
	rootPath          string // roots; empty for key and chain
	last              []byte // content last published; nil once withdrawn

	// For a key and chain: when the published chain stops being valid, and
	// the timer that withdraws it then. gen tells a stale timer (from before
	// a reload) that it has nothing to do.
	notAfter time.Time
	expiry   *time.Timer
	gen      uint64
}

// parseFileResource maps an SDS resource name to files. ok is false when the
// name is not a file resource.
func parseFileResource(name, systemRoots string) (res *fileResource, ok bool, err error) {
	switch {
	case name == SystemRootResource:
		if systemRoots == "" {
			return nil, true, fmt.Errorf("%s: no OS trust bundle found (looked for %s)", name, strings.Join(systemRootCandidates, ", "))
		}
		return &fileResource{name: name, rootPath: systemRoots}, true, nil
	case strings.HasPrefix(name, FileRootPrefix):
		p := strings.TrimPrefix(name, FileRootPrefix)
		if p == "" {
			return nil, true, fmt.Errorf("SDS resource %q: want file-root:<path>", name)
		}
		return &fileResource{name: name, rootPath: p}, true, nil
	case strings.HasPrefix(name, FileCertPrefix):
		c, k, found := strings.Cut(strings.TrimPrefix(name, FileCertPrefix), "~")
		if !found || c == "" || k == "" {
			return nil, true, fmt.Errorf("SDS resource %q: want file-cert:<cert path>~<key path>", name)
		}
		return &fileResource{name: name, certPath: c, keyPath: k}, true, nil
	}
	return nil, false, nil
}

func (r *fileResource) paths() []string {
	if r.rootPath != "" {
		return []string{r.rootPath}
	}
	return []string{r.certPath, r.keyPath}
}

// load reads and checks the files. Errors name the file at fault. notAfter
// is when a key and chain stops being valid: the earliest NotAfter in the
// chain (an expired intermediate breaks it as surely as the leaf). It is
// zero for roots, which are not withdrawn: bundles commonly hold expired
// roots beside good ones, and Envoy skips those itself.
func (r *fileResource) load(now time.Time) (content []byte, sec *tlsv3.Secret, notAfter time.Time, err error) {
	if r.rootPath != "" {
		b, err := os.ReadFile(r.rootPath)
		if err != nil {
			return nil, nil, time.Time{}, fmt.Errorf("%s: read roots: %w", r.name, err)
		}
		if _, _, err := certs.ParseRoots(b); err != nil {
			return nil, nil, time.Time{}, fmt.Errorf("%s: roots file %s: %w", r.name, r.rootPath, err)
		}
		return b, rootSecret(r.name, b), time.Time{}, nil
	}
	chain, err := os.ReadFile(r.certPath)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("%s: read certificate chain: %w", r.name, err)
	}
	key, err := os.ReadFile(r.keyPath)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("%s: read private key: %w", r.name, err)
	}
	if _, err := certs.VerifyChain(chain, certs.Check{KeyPEM: key, Now: now}); err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("%s: refusing certificate %s with key %s: %w", r.name, r.certPath, r.keyPath, err)
	}
	cs, err := certs.ParseCerts(chain)
	if err != nil { // VerifyChain parsed it already
		return nil, nil, time.Time{}, fmt.Errorf("%s: certificate %s: %w", r.name, r.certPath, err)
	}
	for _, c := range cs {
		if notAfter.IsZero() || c.NotAfter.Before(notAfter) {
			notAfter = c.NotAfter
		}
	}
	if !now.Before(notAfter) {
		return nil, nil, time.Time{}, fmt.Errorf("%s: refusing certificate %s: the chain expired at %s (NotAfter); replace the files",
			r.name, r.certPath, notAfter.UTC().Format(time.RFC3339))
	}
	content = append(append(bytes.Clone(chain), 0), key...)
	return content, keyCertSecret(r.name, chain, key), notAfter, nil
}

// fileWatcher serves file resources and pushes them again when their files
// change. It watches directories, not files: Kubernetes replaces a mounted
// Secret by swapping the "..data" symlink in the mount directory, which a
// watch on the old file never sees.
type fileWatcher struct {
	log      *zap.Logger
	store    *store
	metrics  *metrics
	debounce time.Duration
	system   string

	mu   sync.Mutex
	w    *fsnotify.Watcher // nil until run starts
	res  map[string]*fileResource
	dirs map[string]bool
}

func newFileWatcher(log *zap.Logger, st *store, m *metrics, debounce time.Duration, systemRoots string) *fileWatcher {
	return &fileWatcher{
		log: log, store: st, metrics: m, debounce: debounce, system: systemRoots,
		res: map[string]*fileResource{}, dirs: map[string]bool{},
	}
}

// ensure makes sure the named file resource is loaded and watched. It
// returns ok=false for names that are not file resources.
func (f *fileWatcher) ensure(name string) (ok bool, err error) {
	res, ok, err := parseFileResource(name, f.system)
	if !ok || err != nil {
		return ok, err
	}
	return true, f.add(res, true)
}

// add loads res, publishes it and watches its files. With mustLoad false a
// load failure is only logged: the watch stays, and the resource appears
// once the files are right.
func (f *fileWatcher) add(res *fileResource, mustLoad bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.w == nil {
		return errors.New("SDS file watcher is not running")
	}
	if _, known := f.res[res.name]; known {
		if _, ok := f.store.get(res.name); ok {
			return nil
		}
		res = f.res[res.name]
	}
	content, sec, notAfter, err := res.load(time.Now())
	if err != nil {
		f.metrics.secretFailures.Inc()
		if mustLoad {
			return err
		}
		f.log.Error("cannot serve file secret yet; waiting for the files to change", zap.Error(err))
	} else {
		f.publishLocked(res, content, sec, notAfter)
		f.log.Info("serving file secret", zap.String("resource", res.name))
	}
	f.res[res.name] = res
	f.watchLocked(res)
	return nil
}

// watchLocked watches the directory of each file and of its symlink target.
func (f *fileWatcher) watchLocked(res *fileResource) {
	for _, p := range res.paths() {
		dirs := []string{filepath.Dir(abs(p))}
		if t, err := filepath.EvalSymlinks(p); err == nil {
			dirs = append(dirs, filepath.Dir(abs(t)))
		}
		for _, d := range dirs {
			if f.dirs[d] {
				continue
			}
			if err := f.w.Add(d); err != nil {
				f.metrics.watchFailures.Inc()
				f.log.Error("cannot watch certificate directory; changes to its files will be missed until the next event elsewhere",
					zap.String("dir", d), zap.String("resource", res.name), zap.Error(err))
				continue
			}
			f.dirs[d] = true
		}
	}
}

func abs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// start opens the inotify watcher; run must follow.
func (f *fileWatcher) start() error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		f.metrics.watchFailures.Inc()
		return fmt.Errorf("sds: start file watcher: %w", err)
	}
	f.mu.Lock()
	f.w = w
	f.mu.Unlock()
	return nil
}

// run debounces file events and reloads. A reload that fails (say the key
// was written before its certificate) is retried with growing waits for a
// while; the old secret stays served meanwhile.
func (f *fileWatcher) run(ctx context.Context) error {
	defer func() {
		f.stopTimers()
		f.mu.Lock()
		_ = f.w.Close()
		f.mu.Unlock()
	}()
	var (
		timer   *time.Timer
		timerC  <-chan time.Time
		retries int
	)
	const maxRetries = 7 // 100ms doubling: about 25s in all
	arm := func(d time.Duration) {
		if timer == nil {
			timer = time.NewTimer(d)
		} else {
			timer.Reset(d)
		}
		timerC = timer.C
	}
	for {
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case ev, ok := <-f.w.Events:
			if !ok {
				return nil
			}
			if ev.Has(fsnotify.Remove) {
				f.mu.Lock()
				delete(f.dirs, filepath.Clean(ev.Name)) // the kernel dropped that watch
				f.mu.Unlock()
			}
			if timerC == nil {
				retries = 0
				arm(f.debounce)
			}
		case err, ok := <-f.w.Errors:
			if !ok {
				return nil
			}
			f.metrics.watchFailures.Inc()
			f.log.Error("certificate file watch error", zap.Error(err))
		case <-timerC:
			timerC = nil
			if f.reloadAll() {
				retries = 0
				continue
			}
			if retries < maxRetries {
				arm(f.debounce << retries)
				retries++
			}
		}
	}
}

// reloadAll reads every file resource again and publishes those that
// changed. It reports whether all loaded.
func (f *fileWatcher) reloadAll() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	allOK := true
	now := time.Now()
	for _, res := range f.res {
		content, sec, notAfter, err := res.load(now)
		if err != nil {
			allOK = false
			f.metrics.secretFailures.Inc()
			if res.last != nil {
				f.log.Error("certificate files changed but cannot be used; still serving the previous secret", zap.Error(err))
			} else {
				f.log.Error("certificate files changed but cannot be used; nothing is served for them", zap.Error(err))
			}
			continue
		}
		f.watchLocked(res) // a symlink swap may point somewhere new
		if bytes.Equal(content, res.last) {
			continue
		}
		f.publishLocked(res, content, sec, notAfter)
		f.log.Info("certificate files changed: pushing to Envoy", zap.String("resource", res.name))
	}
	return allOK
}

// publishLocked serves a freshly loaded secret and, for a key and chain,
// arms the timer that withdraws it at notAfter (replacing the timer of the
// content it supersedes).
func (f *fileWatcher) publishLocked(res *fileResource, content []byte, sec *tlsv3.Secret, notAfter time.Time) {
	res.last = content
	res.notAfter = notAfter
	res.gen++
	if res.expiry != nil {
		res.expiry.Stop()
		res.expiry = nil
	}
	f.store.set(res.name, sec, notAfter)
	if res.name == WorkloadResource {
		f.metrics.setExpiry(notAfter)
	}
	if notAfter.IsZero() {
		return
	}
	gen := res.gen
	res.expiry = time.AfterFunc(time.Until(notAfter), func() { f.expire(res, gen) })
}

// expire withdraws a file key and chain at its NotAfter, as the CA path
// withdraws an expired workload certificate: new requests for it wait
// (default) or are refused (file-cert:) until the files hold a valid one.
// Envoys that already hold it keep it: SotW SDS cannot take a secret back,
// and their peers refuse it. The next good files are pushed to them.
func (f *fileWatcher) expire(res *fileResource, gen uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if res.gen != gen || res.last == nil {
		return // reloaded or stopped since this timer was armed
	}
	res.last = nil
	res.expiry = nil
	f.store.remove(res.name)
	if res.name == WorkloadResource {
		f.metrics.setExpiry(time.Time{})
	}
	f.metrics.secretFailures.Inc()
	f.log.Error("file certificate expired: no longer serving it; replace the files",
		zap.String("resource", res.name), zap.String("cert", res.certPath), zap.String("key", res.keyPath),
		zap.Time("not_after", res.notAfter))
}

// stopTimers stops every expiry timer; run calls it on the way out.
func (f *fileWatcher) stopTimers() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, res := range f.res {
		res.gen++
		if res.expiry != nil {
			res.expiry.Stop()
			res.expiry = nil
		}
	}
}
