// Command envoysim is an Envoy stand-in for tests, since Envoy cannot be
// installed where Outrigger's tests run. It takes Envoy's command line,
// parses the bootstrap strictly with Envoy's own protos (failing where Envoy
// would), serves the admin API the agent uses (/ready, /stats, /certs,
// /config_dump, ...), opens ADS (SotW or Delta as the bootstrap says) on
// the xds-grpc cluster for CDS, EDS, LDS and RDS in Envoy's order, fetches
// the secrets its TLS contexts name over SDS (sds-grpc), ACKs or NACKs
// what it gets, stays INITIALIZING until what the first clusters and
// listeners need has arrived, proxies what iptables sends to its 15001 and
// 15006 listeners to the original destination or the matching listener's
// cluster (one access-log line per connection on stdout), and drains and
// exits like Envoy. docs/proxy.md describes exactly what is modelled.
//
// Test hooks, by environment variable (none is Envoy's):
//
//	ENVOYSIM_CRASH_AFTER=2s     exit with ENVOYSIM_EXIT_CODE (default 1) after the delay
//	ENVOYSIM_EXIT_CODE=N        the code for ENVOYSIM_CRASH_AFTER
//	ENVOYSIM_IGNORE_SIGTERM=1   ignore SIGTERM (to test the supervisor's SIGKILL)
//	ENVOYSIM_SLOW_ACK=500ms     wait before each ACK/NACK
//	ENVOYSIM_REJECT=cds,eds,... NACK every update of these types
//	ENVOYSIM_RECORD=path        append "pid arg..." to path at start
//
// It is test infrastructure only: the product never imports it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// options is the subset of Envoy's command line that changes behaviour;
// every other flag the agent passes is accepted and checked for syntax.
type options struct {
	configPath, configYAML string
	drainTime              time.Duration
	drainStrategy          string
	ipVersion              string
	logLevel, compLevel    string
	concurrency            int
	mode                   string
	adminAddressPath       string
}

var envoyLevels = map[string]bool{"trace": true, "debug": true, "info": true, "warning": true, "warn": true, "error": true, "critical": true, "off": true}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("envoy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.configPath, "c", "", "bootstrap file")
	fs.StringVar(&o.configPath, "config-path", "", "bootstrap file")
	fs.StringVar(&o.configYAML, "config-yaml", "", "bootstrap overlay")
	drainS := fs.Int("drain-time-s", 600, "drain time in seconds")
	fs.StringVar(&o.drainStrategy, "drain-strategy", "gradual", "gradual or immediate")
	fs.StringVar(&o.ipVersion, "local-address-ip-version", "v4", "v4 or v6")
	fs.Int("file-flush-interval-msec", 10000, "")
	fs.Int("file-flush-min-size-kb", 64, "")
	fs.Bool("disable-hot-restart", false, "")
	fs.Bool("allow-unknown-static-fields", false, "")
	fs.Bool("reject-unknown-dynamic-fields", false, "")
	fs.Bool("skip-deprecated-logs", false, "")
	fs.Bool("enable-core-dump", false, "")
	fs.StringVar(&o.logLevel, "l", "info", "log level")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level")
	fs.StringVar(&o.compLevel, "component-log-level", "", "comp:level,...")
	fs.String("log-format", "", "")
	fs.String("log-path", "", "")
	fs.IntVar(&o.concurrency, "concurrency", 0, "worker threads")
	fs.Int("base-id", 0, "")
	fs.Bool("use-dynamic-base-id", false, "")
	fs.Int("restart-epoch", 0, "")
	fs.Int("parent-shutdown-time-s", 900, "")
	fs.String("service-cluster", "", "")
	fs.String("service-node", "", "")
	fs.String("service-zone", "", "")
	fs.StringVar(&o.mode, "mode", "serve", "serve or validate")
	fs.StringVar(&o.adminAddressPath, "admin-address-path", "", "file to write the admin address to")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	o.drainTime = time.Duration(*drainS) * time.Second
	if o.drainStrategy != "gradual" && o.drainStrategy != "immediate" {
		return o, fmt.Errorf("error: unknown drain strategy %s", o.drainStrategy)
	}
	if o.ipVersion != "v4" && o.ipVersion != "v6" {
		return o, fmt.Errorf("error: unknown IP address version '%s'", o.ipVersion)
	}
	if !envoyLevels[o.logLevel] {
		return o, fmt.Errorf("error: invalid log level specified '%s'", o.logLevel)
	}
	if o.compLevel != "" {
		for _, p := range strings.Split(o.compLevel, ",") {
			_, l, ok := strings.Cut(p, ":")
			if !ok || !envoyLevels[l] {
				return o, fmt.Errorf("error: component log level not correctly specified '%s'", p)
			}
		}
	}
	if o.mode != "serve" && o.mode != "validate" {
		return o, fmt.Errorf("error: unknown mode '%s'", o.mode)
	}
	return o, nil
}

// hooks are the ENVOYSIM_* test controls.
type hooks struct {
	crashAfter time.Duration
	exitCode   int
	ignoreTerm bool
	slowAck    time.Duration
	reject     map[string]bool
	record     string
}

func parseHooks() (hooks, error) {
	h := hooks{exitCode: 1, reject: map[string]bool{}}
	var err error
	if v := os.Getenv("ENVOYSIM_CRASH_AFTER"); v != "" {
		if h.crashAfter, err = time.ParseDuration(v); err != nil {
			return h, fmt.Errorf("ENVOYSIM_CRASH_AFTER: %w", err)
		}
	}
	if v := os.Getenv("ENVOYSIM_EXIT_CODE"); v != "" {
		if h.exitCode, err = strconv.Atoi(v); err != nil {
			return h, fmt.Errorf("ENVOYSIM_EXIT_CODE: %w", err)
		}
	}
	h.ignoreTerm, _ = strconv.ParseBool(os.Getenv("ENVOYSIM_IGNORE_SIGTERM"))
	if v := os.Getenv("ENVOYSIM_SLOW_ACK"); v != "" {
		if h.slowAck, err = time.ParseDuration(v); err != nil {
			return h, fmt.Errorf("ENVOYSIM_SLOW_ACK: %w", err)
		}
	}
	for _, t := range strings.Split(os.Getenv("ENVOYSIM_REJECT"), ",") {
		if t = strings.TrimSpace(t); t != "" {
			h.reject[t] = true
		}
	}
	h.record = os.Getenv("ENVOYSIM_RECORD")
	return h, nil
}

// sim is one running envoysim.
type sim struct {
	opts  options
	hooks hooks
	bs    *bootstrapv3.Bootstrap
	stats *stats
	log   *log.Logger
	alog  *log.Logger  // access log (stdout), one line per proxied connection
	state atomic.Int32 // server.state
	start time.Time

	res       *resources
	listeners *listenerManager
	ads       *ads       // nil without dynamic resources
	sds       *sdsClient // set before anything can reference a secret
	init      *initManager
	kick      chan struct{} // wakes the init loop
	adsKick   chan struct{} // wakes the ADS stream
	exit      chan int      // a request to exit with this code
}

func (s *sim) setState(st int32) {
	s.state.Store(st)
	s.stats.set("server.state", uint64(st))
	s.stats.set("server.live", boolU(st == stateLive))
}

func boolU(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// Envoy's server.state values.
const (
	stateLive            = 0
	stateDraining        = 1
	statePreInitializing = 2
	stateInitializing    = 3
)

// requestExit asks the main loop to exit with code (first request wins).
func (s *sim) requestExit(code int) {
	select {
	case s.exit <- code:
	default:
	}
}

func (s *sim) goLive() {
	s.stats.set("listener_manager.workers_started", 1)
	s.setState(stateLive)
	s.log.Printf("all dependencies initialized. starting workers")
}

func run(args []string, stdout, stderr io.Writer) int {
	logger := log.New(stderr, "[envoysim] ", log.LstdFlags|log.Lmicroseconds)
	opts, err := parseFlags(args, stderr)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, err)
		}
		return 1
	}
	h, err := parseHooks()
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if h.record != "" {
		if f, err := os.OpenFile(h.record, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			fmt.Fprintf(f, "%d %s\n", os.Getpid(), strings.Join(args, " "))
			f.Close()
		}
	}
	bs, err := loadBootstrap(opts.configPath, opts.configYAML)
	if err != nil {
		logger.Printf("critical: error initializing configuration '%s': %v", opts.configPath, err)
		return 1
	}
	if opts.mode == "validate" {
		fmt.Fprintf(stderr, "configuration '%s' OK\n", opts.configPath)
		return 0
	}
	s := &sim{opts: opts, hooks: h, bs: bs, stats: newStats(), log: logger, alog: log.New(stdout, "[envoysim] ", 0),
		start: time.Now(), res: newResources(), init: newInitManager(),
		kick: make(chan struct{}, 1), adsKick: make(chan struct{}, 1), exit: make(chan int, 1)}
	return s.serve()
}

func (s *sim) serve() int {
	sigs := make(chan os.Signal, 2)
	if s.hooks.ignoreTerm {
		signal.Ignore(syscall.SIGTERM)
		signal.Notify(sigs, syscall.SIGINT)
	} else {
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	}
	defer signal.Stop(sigs)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.setState(statePreInitializing)
	s.stats.set("listener_manager.workers_started", 0)
	s.listeners = newListenerManager(s)
	s.sds = newSDSClient(ctx, s)
	defer s.sds.close()

	admin, err := s.startAdmin()
	if err != nil {
		s.log.Printf("critical: %v", err)
		return 1
	}
	defer admin.Close()
	for _, l := range s.bs.GetStaticResources().GetListeners() {
		if err := s.listeners.add(l, false); err != nil {
			s.log.Printf("critical: error adding listener '%s': %v", l.GetName(), err)
			s.listeners.closeAll()
			return 1
		}
	}
	ads, err := newADS(s)
	if err != nil {
		s.log.Printf("critical: %v", err)
		s.listeners.closeAll()
		return 1
	}
	s.ads = ads
	s.setState(stateInitializing)
	s.syncSecrets() // static clusters and listeners may reference secrets
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.runInit(ctx)
	}()
	if ads != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ads.run(ctx)
		}()
	}
	var crash <-chan time.Time
	if s.hooks.crashAfter > 0 {
		crash = time.After(s.hooks.crashAfter)
	}
	code := 0
	select {
	case sig := <-sigs:
		s.log.Printf("caught %s", sig)
	case code = <-s.exit:
	case <-crash:
		s.log.Printf("ENVOYSIM_CRASH_AFTER reached: exiting with code %d", s.hooks.exitCode)
		return s.hooks.exitCode // no cleanup, like a crash
	}
	s.setState(stateDraining)
	s.log.Printf("shutting down server")
	cancel()
	if ads != nil {
		ads.close()
	}
	s.listeners.closeAll()
	s.log.Printf("exiting")
	return code
}
