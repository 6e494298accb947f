package main

import (
	"context"
	"sync"
	"time"
)

// initManager models Envoy's server init manager, reduced to the two
// phases that decide when Envoy goes LIVE:
//
//  1. clusters: the first CDS answer (accepted or rejected), then every
//     cluster's EDS assignment and transport-socket secrets (cluster
//     warming). Only then does Envoy subscribe to LDS.
//  2. listeners: the first LDS answer, then every listener's RDS route
//     configuration and secrets (listener warming).
//
// A dependency counts once its first answer arrives, accepted or
// rejected, or when its config source's initial_fetch_timeout (default
// 15 s, 0 = forever) has passed since it was first wanted, as in Envoy.
// Static clusters and listeners take part in the same phases.
type initManager struct {
	mu       sync.Mutex
	cdsWarm  bool
	ldsWarm  bool
	since    map[string]time.Time // first time a dependency was pending
	cdsReady chan struct{}        // closed when the cluster phase ends
	waiting  []string             // what the current phase waits for (for the log)
}

func newInitManager() *initManager {
	return &initManager{since: map[string]time.Time{}, cdsReady: make(chan struct{})}
}

// changed wakes the init loop and the ADS stream.
func (s *sim) changed() {
	for _, ch := range []chan struct{}{s.kick, s.adsKick} {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// syncSecrets (re)subscribes SDS to what the current config references.
func (s *sim) syncSecrets() {
	if s.sds != nil {
		s.sds.ensure(s.wantedSecrets())
	}
}

// runInit evaluates the init phases until the server is LIVE.
func (s *sim) runInit(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	lastLog := time.Now()
	for {
		if s.evaluateInit() {
			return
		}
		if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			s.init.mu.Lock()
			s.log.Printf("init: waiting for %v", s.init.waiting)
			s.init.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.kick:
		}
	}
}

// satisfied reports whether a dependency has been answered or has timed
// out.
func (s *sim) satisfied(d dependency, now time.Time) bool {
	var answered bool
	switch d.typeURL {
	case edsType, rdsType:
		answered = s.ads != nil && s.ads.isAnswered(d.typeURL, d.name)
	case secretType:
		answered = s.sds != nil && s.sds.isAnswered(d.name)
	}
	if answered {
		return true
	}
	im := s.init
	first, ok := im.since[d.key()]
	if !ok {
		im.since[d.key()] = now
		first = now
	}
	if d.timeout > 0 && now.Sub(first) >= d.timeout {
		s.log.Printf("warning: init: %s %q not received within initial_fetch_timeout %v; continuing", shortType(d.typeURL), d.name, d.timeout)
		return true
	}
	return false
}

// evaluateInit moves the phases on and returns true once LIVE (or
// draining).
func (s *sim) evaluateInit() bool {
	if st := s.state.Load(); st == stateLive || st == stateDraining {
		return true
	}
	im := s.init
	im.mu.Lock()
	defer im.mu.Unlock()
	now := time.Now()
	pending := func(ds []dependency) []string {
		var out []string
		for _, d := range ds {
			if !s.satisfied(d, now) {
				out = append(out, shortType(d.typeURL)+":"+d.name)
			}
		}
		return out
	}
	if !im.cdsWarm {
		if s.ads != nil && !s.ads.isAnswered(cdsType, "") {
			im.waiting = []string{"cds"}
			return false
		}
		var deps []dependency
		for _, c := range s.allClusters() {
			deps = append(deps, clusterDeps(c)...)
		}
		if im.waiting = pending(deps); len(im.waiting) > 0 {
			return false
		}
		im.cdsWarm = true
		close(im.cdsReady)
		s.log.Printf("cm init: all clusters initialized")
		s.changed()
	}
	if !im.ldsWarm {
		if s.ads != nil && !s.ads.isAnswered(ldsType, "") {
			im.waiting = []string{"lds"}
			return false
		}
		var deps []dependency
		for _, l := range s.allListeners() {
			deps = append(deps, listenerDeps(l)...)
		}
		if im.waiting = pending(deps); len(im.waiting) > 0 {
			return false
		}
		im.ldsWarm = true
	}
	s.goLive()
	return true
}
