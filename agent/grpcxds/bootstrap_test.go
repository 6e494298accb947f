package grpcxds

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func TestWriteGolden(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "etc", "istio", "proxy", "grpc-bootstrap.json")
	b := Bootstrap{
		SocketPath: "/etc/istio/proxy/XDS",
		NodeID:     "sidecar~10.1.2.3~app-1.default~default.svc.cluster.local",
		Metadata:   map[string]any{"NAMESPACE": "default", "GENERATOR": "envoy", "LABELS": map[string]string{"app": "a"}},
		Locality:   Locality{Region: "r1", Zone: "z1"},
	}
	if err := Write(path, b); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "bootstrap.golden")
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("bootstrap (-want +got):\n%s", diff)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("file mode %v, want 0644", st.Mode().Perm())
	}
	dst, _ := os.Stat(filepath.Dir(path))
	if dst.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", dst.Mode().Perm())
	}
	// Rewriting replaces the file and leaves no temp files behind.
	if err := Write(path, b); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries after rewrite, want 1", len(ents))
	}
}

func TestRelativeSocketBecomesAbsolute(t *testing.T) {
	out, err := Render(Bootstrap{SocketPath: "./etc/istio/proxy/XDS", NodeID: "n"})
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	want := `"server_uri": "unix://` + filepath.Join(wd, "etc/istio/proxy/XDS") + `"`
	if !contains(string(out), want) {
		t.Errorf("bootstrap lacks %s:\n%s", want, out)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
