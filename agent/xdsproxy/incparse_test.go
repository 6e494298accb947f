package xdsproxy

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

var updateFuzzSeeds = flag.Bool("update-fuzz-seeds", false, "rewrite testdata/fuzz/FuzzIncrementalParse")

// parsed is what a parser made of a message: the envelope with the
// resource offsets, or the error (then nothing else counts).
type parsed struct {
	TypeURL, Version, Nonce string
	Removed                 []string
	Resources               []resourceRef
	Err                     string
}

func parsedOf(f *frame, err error) parsed {
	if err != nil {
		return parsed{Err: err.Error()}
	}
	return parsed{TypeURL: f.typeURL, Version: f.version, Nonce: f.nonce, Removed: f.removed, Resources: f.resources}
}

var cmpParsed = cmp.AllowUnexported(resourceRef{})

// split cuts raw into buffers at the offsets in cuts (ascending, inside
// raw).
func split(raw []byte, cuts []int) mem.BufferSlice {
	var out mem.BufferSlice
	prev := 0
	for _, c := range append(cuts, len(raw)) {
		if c > prev {
			out = append(out, mem.SliceBuffer(raw[prev:c:c]))
			prev = c
		}
	}
	return out
}

func startsOf(data mem.BufferSlice) []int {
	starts := make([]int, len(data))
	off := 0
	for i, b := range data {
		starts[i] = off
		off += b.Len()
	}
	return starts
}

// parseWhole is the reference: frame.parse over the same buffers.
func parseWhole(delta bool, data mem.BufferSlice) parsed {
	f := &frame{delta: delta, data: data, size: data.Len(), starts: startsOf(data)}
	return parsedOf(f, f.parse())
}

// parseIncremental feeds data to an incParser in batches (batches[i] is the
// number of buffers in batch i; what is left over is the last batch), as
// fillFrame does: advance after every batch but the last, then finish.
func parseIncremental(delta bool, data mem.BufferSlice, batches []int) parsed {
	p := newIncParser(delta)
	n, have := 0, 0
	for _, k := range batches {
		if n+k >= len(data) {
			break
		}
		for _, b := range data[n : n+k] {
			have += b.Len()
		}
		n += k
		p.advance(data[:n], have)
	}
	f, err := p.finish(data, data.Len(), startsOf(data))
	return parsedOf(f, err)
}

// randomChunking cuts raw into random buffers grouped in random batches;
// sizes are mostly small for a small message and up to tens of KiB for a
// large one.
func randomChunking(rng *rand.Rand, raw []byte) (mem.BufferSlice, []int) {
	maxBuf := 1 + len(raw)/8
	if rng.IntN(4) == 0 {
		maxBuf = 1 + rng.IntN(4)
	}
	var cuts []int
	for off := 0; off < len(raw); {
		off += 1 + rng.IntN(maxBuf)
		if off < len(raw) {
			cuts = append(cuts, off)
		}
	}
	data := split(raw, cuts)
	var batches []int
	for n := 0; n < len(data); {
		k := 1 + rng.IntN(4)
		batches = append(batches, k)
		n += k
	}
	return data, batches
}

// compareChunkings checks the incremental parser against parse for every
// cut of raw into two batches (as whole buffers, and as one-byte buffers),
// byte by byte, and for random chunkings.
func compareChunkings(t *testing.T, delta bool, raw []byte, every bool, random int) {
	t.Helper()
	want := parseWhole(delta, mem.BufferSlice{mem.SliceBuffer(raw)})
	check := func(how string, data mem.BufferSlice, batches []int) {
		t.Helper()
		if got := parseWhole(delta, data); !cmp.Equal(want, got, cmpParsed) {
			t.Fatalf("parse differs with %s (the reference is not stable):\n%s", how, cmp.Diff(want, got, cmpParsed))
		}
		if got := parseIncremental(delta, data, batches); !cmp.Equal(want, got, cmpParsed) {
			t.Fatalf("incremental parse with %s (-parse +incremental):\n%s", how, cmp.Diff(want, got, cmpParsed))
		}
	}
	if every && len(raw) > 1 {
		bytewise := make([]int, len(raw)-1)
		for i := range bytewise {
			bytewise[i] = i + 1
		}
		ones := make([]int, len(raw))
		for i := range ones {
			ones[i] = 1
		}
		for k := 1; k < len(raw); k++ {
			check(fmt.Sprintf("batches [0,%d) [%d,%d)", k, k, len(raw)), split(raw, []int{k}), []int{1})
			check(fmt.Sprintf("one-byte buffers, batches [0,%d) [%d,%d)", k, k, len(raw)), split(raw, bytewise), []int{k})
		}
		check("a batch per byte", split(raw, bytewise), ones)
	}
	rng := rand.New(rand.NewPCG(uint64(len(raw)), 1))
	for i := range random {
		data, batches := randomChunking(rng, raw)
		check(fmt.Sprintf("random chunking %d (%d buffers, batches %v)", i, len(data), batches), data, batches)
	}
}

// Builders of hand-made messages.
func bytesField(b []byte, num protowire.Number, v []byte) []byte {
	return protowire.AppendBytes(protowire.AppendTag(b, num, protowire.BytesType), v)
}

func strField(b []byte, num protowire.Number, v string) []byte {
	return bytesField(b, num, []byte(v))
}

func varintField(b []byte, num protowire.Number, v uint64) []byte {
	return protowire.AppendVarint(protowire.AppendTag(b, num, protowire.VarintType), v)
}

// unknownFields are fields of every wire type the parser skips, a group
// with a nested group included.
func unknownFields(b []byte) []byte {
	b = varintField(b, 9, 1<<40)
	b = protowire.AppendFixed32(protowire.AppendTag(b, 10, protowire.Fixed32Type), 7)
	b = protowire.AppendFixed64(protowire.AppendTag(b, 11, protowire.Fixed64Type), 8)
	b = strField(b, 17, "unknown bytes")
	b = protowire.AppendTag(b, 20, protowire.StartGroupType)
	b = varintField(b, 1, 3)
	b = protowire.AppendTag(b, 21, protowire.StartGroupType)
	b = strField(b, 2, "nested")
	b = protowire.AppendTag(b, 21, protowire.EndGroupType)
	b = protowire.AppendTag(b, 20, protowire.EndGroupType)
	return b
}

func anyBytes(typeURL string, value []byte) []byte {
	b, _ := proto.Marshal(&anypb.Any{TypeUrl: typeURL, Value: value})
	return b
}

// deltaResourceBytes is a Resource with its fields in the given order
// ("n" name, "v" version, "r" resource, "u" unknown).
func deltaResourceBytes(order, name, version string, value []byte) []byte {
	var b []byte
	for _, c := range order {
		switch c {
		case 'n':
			b = strField(b, resName, name)
		case 'v':
			b = strField(b, resVersion, version)
		case 'r':
			b = bytesField(b, resAny, anyBytes(cdsType, value))
		case 'u':
			b = unknownFields(b)
		}
	}
	return b
}

// incParseMessages are well-formed and malformed messages, SotW and Delta.
func incParseMessages(t testing.TB) []struct {
	name  string
	delta bool
	raw   []byte
} {
	marshal := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	sotw := marshal(bigSotw(cdsType, 3, 10))
	delta := marshal(bigDelta(edsType, 3, 10))

	// SotW, fields in any order, repeated, unknown fields between them.
	var shuffled []byte
	shuffled = strField(shuffled, sotwTypeURL, ldsType)
	shuffled = bytesField(shuffled, sotwResource, anyBytes(ldsType, []byte("first")))
	shuffled = unknownFields(shuffled)
	shuffled = strField(shuffled, sotwNonce, "n-early")
	shuffled = bytesField(shuffled, sotwResource, anyBytes(ldsType, bytes.Repeat([]byte("y"), 300)))
	shuffled = strField(shuffled, sotwVersion, "v1")
	shuffled = varintField(shuffled, sotwVersion, 5) // wrong wire type: skipped
	shuffled = bytesField(shuffled, sotwResource, nil)
	shuffled = strField(shuffled, deltaRemoved, "not a sotw field")
	shuffled = strField(shuffled, sotwVersion, "v2") // the last one counts
	shuffled = strField(shuffled, sotwNonce, "n-late")

	// Delta, resource fields in any order, unknown fields, removed resources.
	var d []byte
	d = strField(d, deltaRemoved, "gone-1")
	d = strField(d, deltaNonce, "d-nonce")
	d = bytesField(d, deltaResource, deltaResourceBytes("vrn", "a", "1", []byte("A")))
	d = unknownFields(d)
	d = bytesField(d, deltaResource, deltaResourceBytes("urnvu", "b", "2", bytes.Repeat([]byte("B"), 200)))
	d = strField(d, deltaVersion, "sys-1")
	d = bytesField(d, deltaResource, deltaResourceBytes("r", "", "", nil)) // nameless
	d = strField(d, deltaTypeURL, cdsType)
	d = bytesField(d, deltaResource, deltaResourceBytes("nvnv", "c", "3", nil)) // repeated: the last counts
	d = strField(d, deltaRemoved, "gone-2")
	d = varintField(d, deltaRemoved, 1) // wrong wire type: skipped

	cut := func(b []byte, n int) []byte { return b[:len(b)-n] }
	badResource := bytesField(nil, deltaResource, []byte{0x1a, 0x05, 'a'}) // name longer than the Resource
	tests := []struct {
		name  string
		delta bool
		raw   []byte
	}{
		{"sotw", false, sotw},
		{"delta", true, delta},
		{"sotw shuffled with unknown fields", false, shuffled},
		{"delta shuffled with unknown fields", true, d},
		{"sotw read as delta", true, sotw},
		{"delta read as sotw", false, delta},
		{"empty", false, nil},

		{"sotw truncated field", false, cut(sotw, 3)},
		{"delta truncated field", true, cut(delta, 1)},
		{"sotw length past the end", false, append(append([]byte{}, sotw...), 0x12, 0x7f, 1, 2)},
		{"delta truncated resource in the middle", true, append(bytesField(nil, deltaResource, []byte{0x1a, 0x01})[:4], delta...)},
		{"delta malformed resource", true, append(append(append([]byte{}, delta[:40]...), badResource...), delta[40:]...)},
		{"delta malformed resource then truncated field", true, append(append([]byte{}, badResource...), 0x12, 0x7f)},
		{"end group at the top", false, append(append([]byte{}, sotw...), byte(protowire.EncodeTag(3, protowire.EndGroupType)))},
		{"unterminated group", false, append(protowire.AppendTag(append([]byte{}, sotw[:30]...), 20, protowire.StartGroupType), sotw[30:]...)},
		{"group ended by another number", true, append(append(protowire.AppendTag(nil, 20, protowire.StartGroupType), byte(protowire.EncodeTag(21, protowire.EndGroupType))), delta...)},
		{"reserved wire type", false, append(append([]byte{}, sotw...), byte(protowire.EncodeTag(3, 6)), 0)},
		{"field number 0", true, append([]byte{0x02, 0x00}, delta...)},
		{"overlong varint", false, append(append([]byte{}, sotw...), 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01)},
		{"truncated tag", false, append(append([]byte{}, sotw...), 0x80)},
		{"truncated fixed64", true, append(append([]byte{}, delta...), 0x09, 1, 2, 3)},
	}
	return tests
}

func TestIncrementalParseMatchesParse(t *testing.T) {
	for _, tc := range incParseMessages(t) {
		t.Run(tc.name, func(t *testing.T) {
			compareChunkings(t, tc.delta, tc.raw, true, 200)
		})
	}
	// Large messages: random chunkings only.
	large := []struct {
		name  string
		delta bool
		msg   proto.Message
	}{
		{"large sotw", false, bigSotw(cdsType, 300, 1000)},
		{"large delta", true, bigDelta(edsType, 300, 1000)},
	}
	for _, tc := range large {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := proto.Marshal(tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			compareChunkings(t, tc.delta, raw, false, 40)
			// Malformed at the very end, and in the middle.
			compareChunkings(t, tc.delta, raw[:len(raw)-2], false, 10)
			mid := append(append(append([]byte{}, raw[:len(raw)/2]...), 0x12, 0xff, 0xff, 0x7f), raw[len(raw)/2:]...)
			compareChunkings(t, tc.delta, mid, false, 10)
		})
	}
}

// Before the message is whole, the parser has already read every field
// that arrived whole: the tail is left, not the message.
func TestIncrementalParseAdvances(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			var msg proto.Message = bigSotw(cdsType, 300, 1000)
			if m.delta {
				msg = bigDelta(cdsType, 300, 1000)
			}
			raw, err := proto.Marshal(msg)
			if err != nil {
				t.Fatal(err)
			}
			data := chunked(raw, 16384)
			want := parseWhole(m.delta, data)
			p := newIncParser(m.delta)
			for i := 1; i < len(data); i++ {
				have := data[:i].Len()
				p.advance(data[:i], have)
				// Resources come one after another after the version: those
				// that end within what arrived are read, no more.
				n := 0
				for _, r := range want.Resources {
					if r.off+r.n <= have {
						n++
					}
				}
				if len(p.env.resources) != n {
					t.Fatalf("after %d of %d bytes: %d resources read, want %d", have, len(raw), len(p.env.resources), n)
				}
				if p.env.version == "" {
					t.Fatalf("after %d bytes: the version, the first field, is not read", have)
				}
			}
			f, err := p.finish(data, len(raw), startsOf(data))
			if diff := cmp.Diff(want, parsedOf(f, err), cmpParsed); diff != "" {
				t.Errorf("(-parse +incremental):\n%s", diff)
			}
		})
	}
}

// The message the proxy forwards gets the incremental parser's envelope:
// the same as parse's, with a field order the sniffer does not rely on.
func TestFillFrameEnvelope(t *testing.T) {
	var raw []byte
	raw = strField(raw, deltaNonce, "first-nonce")
	for i := range 100 {
		raw = bytesField(raw, deltaResource, deltaResourceBytes("urvn", "res-"+strconv.Itoa(i), "v"+strconv.Itoa(i), bytes.Repeat([]byte{byte(i)}, 1000)))
	}
	raw = strField(raw, deltaRemoved, "gone")
	raw = strField(raw, deltaTypeURL, cdsType)
	raw = strField(raw, deltaVersion, "sys")
	wire := make([]byte, 5, 5+len(raw))
	binary.BigEndian.PutUint32(wire[1:], uint32(len(raw)))
	wire = append(wire, raw...)

	f, err := recvFrame(trickle(wire, 3000, 0), true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.release()
	if !f.growing() {
		t.Fatal("not forwarded while arriving")
	}
	var env *frame
	if err := f.g.fill(func(e *frame) { env = e }); err != nil {
		t.Fatal(err)
	}
	want := parseWhole(true, mem.BufferSlice{mem.SliceBuffer(raw)})
	if diff := cmp.Diff(want, parsedOf(env, nil), cmpParsed); diff != "" {
		t.Errorf("envelope (-parse +fill):\n%s", diff)
	}
}

// FuzzIncrementalParse: whatever the control plane sends, cut into
// whatever buffers and batches, the incremental parser ends with what
// parse reads (or the same error).
func FuzzIncrementalParse(f *testing.F) {
	for _, tc := range incParseMessages(f) {
		f.Add(tc.raw, tc.delta, uint64(len(tc.raw)))
	}
	f.Fuzz(func(t *testing.T, raw []byte, delta bool, seed uint64) {
		rng := rand.New(rand.NewPCG(seed, 2))
		data, batches := randomChunking(rng, raw)
		want := parseWhole(delta, data)
		if got := parseIncremental(delta, data, batches); !cmp.Equal(want, got, cmpParsed) {
			t.Fatalf("%d buffers, batches %v (-parse +incremental):\n%s", len(data), batches, cmp.Diff(want, got, cmpParsed))
		}
	})
}

// TestWriteFuzzSeeds writes the seed corpus of FuzzIncrementalParse with
// -update-fuzz-seeds.
func TestWriteFuzzSeeds(t *testing.T) {
	if !*updateFuzzSeeds {
		t.Skip("run with -update-fuzz-seeds to rewrite the seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzIncrementalParse")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	large, _ := proto.Marshal(bigDelta(edsType, 20, 300))
	seeds := incParseMessages(t)
	seeds = append(seeds, struct {
		name  string
		delta bool
		raw   []byte
	}{"larger delta", true, large})
	for i, s := range seeds {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\nbool(%v)\nuint64(%d)\n", s.raw, s.delta, i*7919+1)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// BenchmarkTailParse is what is left to do on a 7 MB push (3000 resources)
// between its last chunk arriving and its envelope being ready, with the
// rest arrived in 16 KiB buffers: "parse" reads the whole message then (as
// before the incremental parser), "incremental" only the fields the last
// buffer completes.
func BenchmarkTailParse(b *testing.B) {
	for _, m := range modes {
		raw := bigPush(b, m.delta)
		data := chunked(raw, 16384)
		starts := startsOf(data)
		b.Run(m.name+"/parse", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				env := &frame{delta: m.delta, data: data, size: len(raw), starts: starts}
				if err := env.parse(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(m.name+"/incremental", func(b *testing.B) {
			before := newIncParser(m.delta)
			before.advance(data[:len(data)-1], data[:len(data)-1].Len())
			b.ReportAllocs()
			for b.Loop() {
				p := *before
				if _, err := p.finish(data, len(raw), starts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
