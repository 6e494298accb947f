package iptables

import (
	"errors"
	"strings"
	"testing"
)

func TestChooseBackend(t *testing.T) {
	st := func(save string) *savedState {
		s, err := parseSave(save)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	const (
		empty     = ""
		emptyNat  = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
		foreign   = "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 9 -j ACCEPT\nCOMMIT\n"
		istio     = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
		istioOnly = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n"
	)
	broken := errors.New("could not fetch rule set generation id")
	tests := []struct {
		name           string
		force          string
		legacy, nft    string
		nftErr         error
		noLegacy       bool
		want           string
		wantPinned     bool
		wantErrContain string
	}{
		{name: "empty namespace prefers nft", legacy: empty, nft: empty, want: variantNFT},
		{name: "an empty legacy table (left by a probe) does not count", legacy: emptyNat, nft: empty, want: variantNFT},
		{name: "existing legacy rules", legacy: foreign, nft: empty, want: variantLegacy, wantPinned: true},
		{name: "existing nft rules", legacy: emptyNat, nft: foreign, want: variantNFT, wantPinned: true},
		{name: "rules in both: nft", legacy: foreign, nft: foreign, want: variantNFT, wantPinned: true},
		{name: "ISTIO chains beat other rules", legacy: istio, nft: foreign, want: variantLegacy, wantPinned: true},
		{name: "an empty ISTIO chain counts as ours", legacy: istioOnly, nft: empty, want: variantLegacy, wantPinned: true},
		{name: "nft broken", legacy: empty, nft: empty, nftErr: broken, want: variantLegacy},
		{name: "nft broken but forced", force: variantNFT, legacy: foreign, nftErr: broken, want: variantNFT, wantPinned: true},
		{name: "force legacy over nft rules", force: variantLegacy, legacy: empty, nft: istio, want: variantLegacy, wantPinned: true},
		{name: "forced variant not installed", force: variantLegacy, noLegacy: true, nft: empty, wantErrContain: "--force-iptables-binary=legacy"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var states []*backendState
			if !tt.noLegacy {
				states = append(states, &backendState{B: &backend{Variant: variantLegacy}, St: st(tt.legacy)})
			}
			n := &backendState{B: &backend{Variant: variantNFT}, Err: tt.nftErr}
			if tt.nftErr == nil {
				n.St = st(tt.nft)
			}
			states = append(states, n)
			c, err := chooseBackend(tt.force, states)
			if tt.wantErrContain != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErrContain) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErrContain)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.B.Variant != tt.want || c.Pinned != tt.wantPinned {
				t.Errorf("chose %s (pinned %v, %s), want %s (pinned %v)", c.B.Variant, c.Pinned, c.Reason, tt.want, tt.wantPinned)
			}
		})
	}
}

func TestKernelSupportError(t *testing.T) {
	tests := []struct {
		variant string
		fam     Family
		stderr  string
		want    string // "" = not a kernel support error
	}{
		{variantLegacy, IPv4, "iptables-restore v1.8.9 (legacy): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)\nPerhaps iptables or your kernel needs to be upgraded.", "modprobe iptable_nat"},
		{variantLegacy, IPv6, "ip6tables-restore: unable to initialize table 'mangle'", "modprobe ip6table_mangle"},
		{variantNFT, IPv4, "iptables-nft-restore: Could not fetch rule set generation id: Invalid argument", "modprobe nf_tables"},
		{variantNFT, IPv4, "iptables-nft-restore v1.8.9 (nf_tables): unknown option \"--bogus\"", ""},
		{variantNFT, IPv4, "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)", ""},
	}
	for _, tt := range tests {
		b := &backend{Variant: tt.variant, Family: tt.fam}
		err := kernelSupportError(b, &execError{Cmd: "restore", Stderr: tt.stderr, Err: errors.New("exit status 1")})
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%q: got %v, want no kernel support error", tt.stderr, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, ErrKernelSupport)):
			t.Errorf("%q: got %v, want ErrKernelSupport naming %q", tt.stderr, err, tt.want)
		}
	}
}

func TestPermissionError(t *testing.T) {
	for _, tt := range []struct {
		stderr string
		want   bool
	}{
		{"iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)", true},
		{"Fatal: can't open lock file /run/xtables.lock: Permission denied", true},
		{"iptables-legacy-save: Operation not permitted", true},
		{"ip6tables v1.8.9: can't initialize ip6tables table 'filter': Address family not supported by protocol", false},
		{"iptables-restore: line 3 failed", false},
	} {
		b := &backend{Variant: variantNFT, Family: IPv4}
		err := permissionError(b, &execError{Cmd: "save", Stderr: tt.stderr, Err: errors.New("exit status 4")})
		if got := err != nil; got != tt.want {
			t.Errorf("%q: permission error %v, want %v", tt.stderr, err, tt.want)
			continue
		}
		if tt.want && (!errors.Is(err, ErrPermission) || !strings.Contains(err.Error(), "NET_ADMIN")) {
			t.Errorf("%q: %v does not wrap ErrPermission and name NET_ADMIN", tt.stderr, err)
		}
	}
}
