package memlimit

import (
	"runtime/debug"
	"testing"
	"testing/fstest"
)

func file(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }

func TestCgroupLimit(t *testing.T) {
	tests := []struct {
		name    string
		fs      fstest.MapFS
		want    int64
		wantErr bool
	}{
		{"no proc", fstest.MapFS{}, 0, false},
		{"v2 namespaced root", fstest.MapFS{
			"proc/self/cgroup":         file("0::/\n"),
			"sys/fs/cgroup/memory.max": file("536870912\n"),
		}, 512 << 20, false},
		{"v2 max", fstest.MapFS{
			"proc/self/cgroup":         file("0::/\n"),
			"sys/fs/cgroup/memory.max": file("max\n"),
		}, 0, false},
		{"v2 nested, smallest wins", fstest.MapFS{
			"proc/self/cgroup":                           file("0::/kubepods/pod1/ctr\n"),
			"sys/fs/cgroup/kubepods/pod1/memory.max":     file("1073741824\n"),
			"sys/fs/cgroup/kubepods/pod1/ctr/memory.max": file("max\n"),
			"sys/fs/cgroup/kubepods/memory.max":          file("8589934592\n"),
		}, 1 << 30, false},
		{"v1", fstest.MapFS{
			"proc/self/cgroup": file("12:cpu,cpuacct:/x\n11:memory:/kubepods/ctr\n"),
			"sys/fs/cgroup/memory/kubepods/ctr/memory.limit_in_bytes": file("268435456\n"),
			"sys/fs/cgroup/memory/memory.limit_in_bytes":              file("9223372036854771712\n"),
		}, 256 << 20, false},
		{"v1 unlimited", fstest.MapFS{
			"proc/self/cgroup":                           file("11:memory:/\n"),
			"sys/fs/cgroup/memory/memory.limit_in_bytes": file("9223372036854771712\n"),
		}, 0, false},
		{"garbage", fstest.MapFS{
			"proc/self/cgroup":         file("0::/\n"),
			"sys/fs/cgroup/memory.max": file("lots\n"),
		}, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CgroupLimit(tc.fs)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("CgroupLimit = %d, %v; want %d, error %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestApply(t *testing.T) {
	oldPct := debug.SetGCPercent(100)
	oldLimit := debug.SetMemoryLimit(-1)
	t.Cleanup(func() {
		debug.SetGCPercent(oldPct)
		debug.SetMemoryLimit(oldLimit)
	})
	cg := fstest.MapFS{
		"proc/self/cgroup":         file("0::/\n"),
		"sys/fs/cgroup/memory.max": file("1000000000\n"),
	}
	env := func(kv map[string]string) func(string) string { return func(k string) string { return kv[k] } }
	tests := []struct {
		name      string
		cfg       Config
		wantPct   int // -1: left alone
		wantLimit int64
	}{
		{"defaults", Config{Getenv: env(nil), FS: cg}, DefaultGCPercent, 900000000},
		{"GOGC and GOMEMLIMIT set", Config{Getenv: env(map[string]string{"GOGC": "200", "GOMEMLIMIT": "1GiB"}), FS: cg}, -1, 0},
		{"custom", Config{GCPercent: 30, CgroupFraction: 0.5, Getenv: env(nil), FS: cg}, 30, 500000000},
		{"no cgroup limit", Config{Getenv: env(nil), FS: fstest.MapFS{}}, DefaultGCPercent, 0},
		{"opted out", Config{GCPercent: -1, CgroupFraction: -1, Getenv: env(nil), FS: cg}, -1, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			debug.SetGCPercent(100)
			debug.SetMemoryLimit(1 << 62)
			res, err := Apply(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if res.GCPercent != tc.wantPct || res.MemoryLimit != tc.wantLimit {
				t.Errorf("Apply = %+v; want GC percent %d, limit %d", res, tc.wantPct, tc.wantLimit)
			}
			// What the runtime has now.
			wantPct := tc.wantPct
			if wantPct < 0 {
				wantPct = 100
			}
			if got := debug.SetGCPercent(100); got != wantPct {
				t.Errorf("runtime GC percent %d, want %d", got, wantPct)
			}
			wantLimit := tc.wantLimit
			if wantLimit == 0 {
				wantLimit = 1 << 62
			}
			if got := debug.SetMemoryLimit(-1); got != wantLimit {
				t.Errorf("runtime memory limit %d, want %d", got, wantLimit)
			}
		})
	}
}
