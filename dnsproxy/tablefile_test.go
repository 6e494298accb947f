package dnsproxy

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

func TestParseNameTable(t *testing.T) {
	tests := []struct {
		name, body, wantErr string
	}{
		{name: "ok", body: `{"table": {"a.example.com": {"ips": ["192.0.2.1", "fd00::1"], "registry": "External"}}}`},
		{name: "empty", body: ``, wantErr: "empty file"},
		{name: "no table", body: `{}`, wantErr: `no "table" object`},
		{name: "syntax", body: `{"table": {`, wantErr: "unexpected EOF"},
		{name: "wrong type", body: `{"table": {"a.example.com": {"ips": "192.0.2.1"}}}`, wantErr: `field "table.ips": want []string`},
		{name: "unknown field", body: `{"table": {"a.example.com": {"ip": ["192.0.2.1"]}}}`, wantErr: `unknown field "ip"`},
		{name: "bad ip", body: `{"table": {"a.example.com": {"ips": ["192.0.2.1", "nope"]}}}`, wantErr: `field table["a.example.com"].ips[1]: "nope" is not an IP address`},
		{name: "no ips", body: `{"table": {"a.example.com": {}}}`, wantErr: `table["a.example.com"].ips: no addresses`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseNameTable("/x/table.json", []byte(tc.body))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "/x/table.json") {
				t.Fatalf("error %v, want the file and %q", err, tc.wantErr)
			}
		})
	}
}

func TestWatchNameTableFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "table.json")
	write := func(body string, atomic bool) {
		t.Helper()
		target := path
		if atomic {
			target = filepath.Join(dir, ".tmp")
		}
		if err := os.WriteFile(target, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if atomic {
			if err := os.Rename(target, path); err != nil {
				t.Fatal(err)
			}
		}
	}
	table := func(ip string) string {
		return `{"table": {"a.example.com": {"ips": ["` + ip + `"]}}}`
	}
	write(table("192.0.2.1"), false)

	var mu sync.Mutex
	var got []string
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- WatchNameTableFile(ctx, path, func(nt *nds.NameTable) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, nt.Table["a.example.com"].IPs[0])
		}, zaptest.NewLogger(t))
	}()
	waitFor := func(n int, want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			ok := len(got) == n && got[n-1] == want
			mu.Unlock()
			if ok {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("updates %v, want %d ending in %s", got, n, want)
	}
	waitFor(1, "192.0.2.1")
	write(table("192.0.2.2"), false)
	waitFor(2, "192.0.2.2")
	write(table("192.0.2.3"), true) // atomic rename
	waitFor(3, "192.0.2.3")
	write(`{"table": {"a.example.com": {"ips": ["broken"]}}}`, true)
	time.Sleep(200 * time.Millisecond)
	write(table("192.0.2.4"), true)
	waitFor(4, "192.0.2.4") // the broken file was skipped
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	if err := WatchNameTableFile(context.Background(), filepath.Join(dir, "missing.json"), func(*nds.NameTable) {}, zaptest.NewLogger(t)); err == nil || !strings.Contains(err.Error(), "missing.json") {
		t.Errorf("missing file: %v", err)
	}
}
