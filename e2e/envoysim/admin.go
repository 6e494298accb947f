package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
)

// startAdmin serves the admin API on the bootstrap's admin address. A
// bootstrap without admin gets none, as in Envoy.
func (s *sim) startAdmin() (*http.Server, error) {
	network, addr := "tcp", ""
	switch a := s.bs.GetAdmin().GetAddress(); {
	case a.GetSocketAddress() != nil:
		sa := a.GetSocketAddress()
		addr = net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
	case a.GetPipe() != nil:
		// A unix socket admin, as Envoy allows: tests reach an envoysim
		// in another network namespace through the file system.
		network, addr = "unix", a.GetPipe().GetPath()
		_ = os.Remove(addr)
	default:
		return &http.Server{}, nil
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("cannot bind admin address %s: %w", addr, err)
	}
	if m := s.bs.GetAdmin().GetAddress().GetPipe().GetMode(); m != 0 {
		_ = os.Chmod(addr, os.FileMode(m))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/ready", s.handleReady)
	mux.HandleFunc("/stats", s.handleStats)
	mux.HandleFunc("/stats/prometheus", s.handlePrometheus)
	mux.HandleFunc("/server_info", s.handleServerInfo)
	mux.HandleFunc("/config_dump", s.handleConfigDump)
	mux.HandleFunc("/listeners", s.handleListeners)
	mux.HandleFunc("/certs", s.handleCerts)
	mux.HandleFunc("/drain_listeners", s.post(s.handleDrain))
	mux.HandleFunc("/quitquitquit", s.post(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "OK\n")
		s.log.Printf("quitquitquit requested")
		s.requestExit(0)
	}))
	mux.HandleFunc("/logging", s.post(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "active loggers:\n") }))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "invalid path. admin commands are: /ready /stats /stats/prometheus /server_info /config_dump /certs /listeners /drain_listeners /quitquitquit", http.StatusNotFound)
	})
	const prefix = "listener.admin"
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				s.stats.gaugeAdd(prefix+".downstream_cx_active", 1)
				s.stats.inc(prefix + ".downstream_cx_total")
			case http.StateClosed, http.StateHijacked:
				s.stats.gaugeAdd(prefix+".downstream_cx_active", -1)
			}
		},
	}
	go func() { _ = srv.Serve(ln) }()
	s.log.Printf("admin address: %s", ln.Addr())
	if p := s.opts.adminAddressPath; p != "" {
		if err := os.WriteFile(p, []byte(ln.Addr().String()), 0o644); err != nil {
			srv.Close()
			return nil, fmt.Errorf("cannot write admin address to %s: %w", p, err)
		}
	}
	return srv, nil
}

// post rejects other methods as Envoy does for mutating admin endpoints.
func (s *sim) post(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "This endpoint requires POST.", http.StatusMethodNotAllowed)
			return
		}
		h(w, r)
	}
}

func stateName(st int32) string {
	switch st {
	case stateLive:
		return "LIVE"
	case stateDraining:
		return "DRAINING"
	case statePreInitializing:
		return "PRE_INITIALIZING"
	case stateInitializing:
		return "INITIALIZING"
	}
	return "UNKNOWN"
}

func (s *sim) handleReady(w http.ResponseWriter, _ *http.Request) {
	st := s.state.Load()
	if st != stateLive {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	fmt.Fprintln(w, stateName(st))
}

// statsFilter compiles the filter query parameter. usedonly is implied:
// only written stats exist in the store.
func statsFilter(w http.ResponseWriter, r *http.Request) (*regexp.Regexp, bool) {
	f := r.URL.Query().Get("filter")
	if f == "" {
		return nil, true
	}
	re, err := regexp.Compile(f)
	if err != nil {
		http.Error(w, "Invalid re2 regex", http.StatusBadRequest)
		return nil, false
	}
	return re, true
}

func (s *sim) handleStats(w http.ResponseWriter, r *http.Request) {
	re, ok := statsFilter(w, r)
	if !ok {
		return
	}
	switch r.URL.Query().Get("format") {
	case "prometheus":
		s.handlePrometheus(w, r)
	case "json":
		out := map[string][]map[string]any{"stats": {}}
		for _, st := range s.stats.snapshot(re) {
			out["stats"] = append(out["stats"], map[string]any{"name": st.name, "value": st.value})
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	default:
		w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
		s.stats.writeText(w, re)
	}
}

func (s *sim) handlePrometheus(w http.ResponseWriter, r *http.Request) {
	re, ok := statsFilter(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	s.stats.writePrometheus(w, re)
}

func (s *sim) handleServerInfo(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	node, _ := protojson.Marshal(s.bs.GetNode())
	_ = json.NewEncoder(w).Encode(map[string]any{
		"version":              "envoysim/1.0/Clean/RELEASE/BoringSSL",
		"state":                stateName(s.state.Load()),
		"uptime_current_epoch": fmt.Sprintf("%ds", int(time.Since(s.start).Seconds())),
		"node":                 json.RawMessage(node),
		"command_line_options": map[string]any{
			"concurrency":              s.opts.concurrency,
			"log_level":                s.opts.logLevel,
			"component_log_level":      s.opts.compLevel,
			"drain_time":               fmt.Sprintf("%ds", int(s.opts.drainTime.Seconds())),
			"drain_strategy":           map[string]string{"gradual": "Gradual", "immediate": "Immediate"}[s.opts.drainStrategy],
			"local_address_ip_version": s.opts.ipVersion,
			"config_path":              s.opts.configPath,
		},
	})
}

func (s *sim) handleDrain(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	_, inbound := q["inboundonly"]
	_, graceful := q["graceful"]
	_, skipExit := q["skip_exit"]
	s.listeners.drain(inbound, graceful, skipExit)
	fmt.Fprint(w, "OK\n")
}
