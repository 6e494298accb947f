// Package memlimit sets the Go garbage collector's targets for the agent
// process, which sits in every pod next to Envoy: its memory is multiplied
// by the number of pods, so it trades a little GC CPU for a smaller heap.
//
// Two knobs, each left alone when the operator set it:
//   - GC percent (GOGC): the heap may grow this much over the live data
//     before a collection. Go's default is 100; the agent's live heap is
//     mostly a few large xDS responses in byte buffers, which are cheap to
//     collect (nothing to scan), so a lower value costs little CPU and takes
//     several MB off the peak.
//   - soft memory limit (GOMEMLIMIT): when the container has a memory limit
//     (cgroup v2 memory.max or v1 memory.limit_in_bytes), a fraction of it,
//     so the collector works harder before the kernel's OOM killer would.
package memlimit

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
)

// Defaults, in one place.
const (
	// DefaultGCPercent is used when GOGC is not set (Outrigger only). The
	// live heap during a 3000-service push is ~11 MB, most of it the
	// push's byte buffers (nothing to scan): 25 instead of 50 takes 2.3-2.6
	// MB off the agent's peak RSS on that push at no CPU cost the push
	// benchmark can see (docs/xds.md).
	DefaultGCPercent = 25
	// DefaultCgroupFraction of the container's memory limit becomes the
	// soft limit when GOMEMLIMIT is not set (as automemlimit).
	DefaultCgroupFraction = 0.9
)

// Config says what to apply. Zero values take the defaults.
type Config struct {
	// GCPercent applies when GOGC is not set. Default 25; negative leaves
	// Go's default.
	GCPercent int
	// CgroupFraction of the cgroup memory limit is the soft memory limit
	// when GOMEMLIMIT is not set. Default 0.9; negative sets none.
	CgroupFraction float64
	// Getenv reads the environment (os.Getenv).
	Getenv func(string) string
	// FS is the root file system, for /proc/self/cgroup and
	// /sys/fs/cgroup (os.DirFS("/")).
	FS fs.FS
}

// Result is what Apply did, for the log.
type Result struct {
	// GCPercent set, or -1 when left alone.
	GCPercent int
	// MemoryLimit set in bytes, or 0 when left alone.
	MemoryLimit int64
	// CgroupLimit found, or 0 for none.
	CgroupLimit int64
}

// Apply sets the GC percent and soft memory limit as cfg says. A cgroup
// file that cannot be read or parsed is an error, with nothing but the GC
// percent applied; the agent can run on without it.
func Apply(cfg Config) (Result, error) {
	if cfg.GCPercent == 0 {
		cfg.GCPercent = DefaultGCPercent
	}
	if cfg.CgroupFraction == 0 {
		cfg.CgroupFraction = DefaultCgroupFraction
	}
	res := Result{GCPercent: -1}
	if cfg.Getenv("GOGC") == "" && cfg.GCPercent > 0 {
		debug.SetGCPercent(cfg.GCPercent)
		res.GCPercent = cfg.GCPercent
	}
	if cfg.Getenv("GOMEMLIMIT") != "" || cfg.CgroupFraction < 0 {
		return res, nil
	}
	limit, err := CgroupLimit(cfg.FS)
	if err != nil {
		return res, err
	}
	res.CgroupLimit = limit
	if limit > 0 {
		res.MemoryLimit = int64(float64(limit) * min(cfg.CgroupFraction, 1))
		debug.SetMemoryLimit(res.MemoryLimit)
	}
	return res, nil
}

// unlimited: cgroup v1 reports "no limit" as a huge number (page-rounded
// MaxInt64).
const unlimited = math.MaxInt64 / 2

// CgroupLimit returns the memory limit of the process's cgroup (the
// smallest along its path to the root), or 0 when there is none.
func CgroupLimit(fsys fs.FS) (int64, error) {
	b, err := fs.ReadFile(fsys, "proc/self/cgroup")
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("memlimit: read /proc/self/cgroup: %w", err)
	}
	var v1, v2 string
	found1, found2 := false, false
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2, found2 = parts[2], true
		case hasController(parts[1], "memory"):
			v1, found1 = parts[2], true
		}
	}
	switch {
	case found1:
		return walk(fsys, "sys/fs/cgroup/memory", v1, "memory.limit_in_bytes")
	case found2:
		return walk(fsys, "sys/fs/cgroup", v2, "memory.max")
	}
	return 0, nil
}

func hasController(list, want string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == want {
			return true
		}
	}
	return false
}

// walk reads file in the cgroup's directory and each parent's, and returns
// the smallest limit. Directories that do not exist (a cgroup namespace
// hides the host's path) are skipped.
func walk(fsys fs.FS, root, cgroup, file string) (int64, error) {
	var best int64
	dir := path.Clean("/" + cgroup)
	for {
		p := path.Join(root, dir, file)
		b, err := fs.ReadFile(fsys, p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return 0, fmt.Errorf("memlimit: read /%s: %w", p, err)
		default:
			s := strings.TrimSpace(string(b))
			if s != "max" {
				n, err := strconv.ParseInt(s, 10, 64)
				if err != nil || n <= 0 {
					return 0, fmt.Errorf("memlimit: /%s: %q is not a memory limit", p, s)
				}
				if n < unlimited && (best == 0 || n < best) {
					best = n
				}
			}
		}
		if dir == "/" {
			return best, nil
		}
		dir = path.Dir(dir)
	}
}
