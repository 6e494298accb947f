package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestDoRequest(t *testing.T) {
	type seen struct{ method, path, body string }
	var got seen
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got = seen{r.Method, r.URL.RequestURI(), string(b)}
		switch r.URL.Path {
		case "/missing":
			http.Error(w, "no such page", http.StatusNotFound)
		case "/broken":
			http.Error(w, "boom", http.StatusInternalServerError)
		case "/forbidden":
			http.Error(w, "go away", http.StatusForbidden)
		default:
			_, _ = io.WriteString(w, "OK\n")
		}
	}))
	defer srv.Close()
	tests := []struct {
		method, path, body string
		want               seen
		wantOut, wantErr   string
	}{
		{method: "POST", path: "drain", want: seen{"POST", "/drain", ""}, wantOut: "OK\n"},
		{method: "GET", path: "/stats?usedonly", want: seen{"GET", "/stats?usedonly", ""}, wantOut: "OK\n"},
		{method: "POST", path: "logging", body: "level=debug", want: seen{"POST", "/logging", "level=debug"}, wantOut: "OK\n"},
		{method: "GET", path: "missing", want: seen{"GET", "/missing", ""}, wantOut: "no such page\n"},
		{method: "GET", path: "broken", want: seen{"GET", "/broken", ""}, wantErr: "received unsuccessful status code 500: boom"},
		{method: "GET", path: "forbidden", want: seen{"GET", "/forbidden", ""}, wantErr: "status code 403"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			var out bytes.Buffer
			err := doRequest(context.Background(), &out, srv.URL, tt.method, tt.path, tt.body)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("server saw %+v, want %+v", got, tt.want)
			}
			if out.String() != tt.wantOut {
				t.Errorf("output = %q, want %q", out.String(), tt.wantOut)
			}
		})
	}
}

func TestRequestPortAllowList(t *testing.T) {
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"request", "--debug-port", "8080", "GET", "stats"})
	err := root.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "debug port 8080 is not in allowed list") {
		t.Errorf("err = %v, want the allow-list error", err)
	}
	root = newRootCmd()
	root.SetArgs([]string{"request", "GET"})
	if err := root.ExecuteContext(context.Background()); err == nil {
		t.Error("request with one argument succeeded")
	}
}
