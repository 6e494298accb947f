package health

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/pprof"

	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// lifecycle serves POST /quitquitquit and POST /drain: loopback only (403),
// POST only (405), "OK" and then the hook. Readiness turns 503 first, so the
// pod leaves the endpoints before Envoy stops taking connections.
func (s *Server) lifecycle(hook func(), why string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !fromLoopback(r) {
			http.Error(w, "Only requests from localhost are allowed", http.StatusForbidden)
			return
		}
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
			return
		}
		if hook == nil {
			http.Error(w, "not wired in this agent", http.StatusNotImplemented)
			return
		}
		s.ready.setDraining(why)
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "OK")
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		s.log.Info("lifecycle request", zap.String("path", r.URL.Path))
		hook()
	}
}

// handleNdsz serves the DNS name table as JSON; 404 "{}" when there is none
// (DNS off, or no table yet), as Istio.
func (s *Server) handleNdsz(w http.ResponseWriter, _ *http.Request) {
	var table any
	if s.cfg.NameTable != nil {
		table = s.cfg.NameTable()
	}
	if table == nil {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = io.WriteString(w, "{}")
		return
	}
	var b []byte
	var err error
	if m, ok := table.(proto.Message); ok {
		b, err = protojson.Marshal(m)
	} else {
		b, err = json.Marshal(table)
	}
	if err != nil {
		http.Error(w, "encode name table: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

// pprofHandler serves net/http/pprof on our own mux (never the default one).
func pprofHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
