package dnsproxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/internal/nds"
)

// LoadNameTableFile reads a name table from a JSON file in the shape
// /debug/ndsz prints ({"table": {"host": {"ips": [...], ...}}}). Errors name
// the file and the field at fault.
func LoadNameTableFile(path string) (*nds.NameTable, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("name table %s: %w", path, err)
	}
	return parseNameTable(path, b)
}

func parseNameTable(path string, b []byte) (*nds.NameTable, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var nt nds.NameTable
	if err := dec.Decode(&nt); err != nil {
		var te *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &te):
			return nil, fmt.Errorf("name table %s: field %q: want %s, got JSON %s", path, te.Field, te.Type, te.Value)
		case errors.As(err, &se):
			return nil, fmt.Errorf("name table %s: invalid JSON at byte %d: %w", path, se.Offset, err)
		case errors.Is(err, io.EOF):
			return nil, fmt.Errorf("name table %s: empty file; want {\"table\": {...}}", path)
		}
		return nil, fmt.Errorf("name table %s: %w (fields: table.<host>.ips, registry, shortname, namespace, altHosts)", path, err)
	}
	if nt.Table == nil {
		return nil, fmt.Errorf("name table %s: no \"table\" object; want {\"table\": {\"<host>\": {\"ips\": [...]}}}", path)
	}
	hosts := make([]string, 0, len(nt.Table))
	for h := range nt.Table {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for _, h := range hosts {
		ni := nt.Table[h]
		if ni == nil || len(ni.IPs) == 0 {
			return nil, fmt.Errorf("name table %s: field table[%q].ips: no addresses", path, h)
		}
		for i, ip := range ni.IPs {
			if _, err := netip.ParseAddr(ip); err != nil {
				return nil, fmt.Errorf("name table %s: field table[%q].ips[%d]: %q is not an IP address", path, h, i, ip)
			}
		}
		if wireName(strings.ToLower(h)) == nil {
			return nil, fmt.Errorf("name table %s: table key %q is not a valid DNS name", path, h)
		}
	}
	return &nt, nil
}

// WatchNameTableFile loads path, hands the table to update, and again each
// time the file changes, until ctx ends. It watches the directory, so editors'
// and Kubernetes' atomic replacements (write elsewhere, rename over) are
// seen. A broken file is logged and the previous table stays. It returns an
// error only when the first load or the watch setup fails.
func WatchNameTableFile(ctx context.Context, path string, update func(*nds.NameTable), log *zap.Logger) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("name table %s: watch: %w", path, err)
	}
	defer w.Close()
	if err := w.Add(filepath.Dir(path)); err != nil {
		return fmt.Errorf("name table %s: watch directory: %w", path, err)
	}
	last, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("name table %s: %w", path, err)
	}
	nt, err := parseNameTable(path, last)
	if err != nil {
		return err
	}
	update(nt)
	log.Info("name table loaded", zap.String("file", path), zap.Int("hosts", len(nt.Table)))

	// Events come in bursts (create, write, chmod, rename); settle first.
	const settle = 50 * time.Millisecond
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			_ = ev // any change in the directory may be ours (symlink swaps included)
			timer.Reset(settle)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			log.Warn("name table watch error", zap.String("file", path), zap.Error(err))
		case <-timer.C:
			b, err := os.ReadFile(path)
			if err != nil {
				if !errors.Is(err, os.ErrNotExist) {
					log.Warn("name table unreadable; keeping the previous one", zap.String("file", path), zap.Error(err))
				}
				continue
			}
			if bytes.Equal(b, last) {
				continue
			}
			last = b
			nt, err := parseNameTable(path, b)
			if err != nil {
				log.Warn("name table invalid; keeping the previous one", zap.Error(err))
				continue
			}
			update(nt)
			log.Info("name table reloaded", zap.String("file", path), zap.Int("hosts", len(nt.Table)))
		}
	}
}
