package h2grpc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const adsMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

// adsLike answers each request message (whose first 4 bytes give a size)
// with one response message of that size, until the client ends the stream.
func adsLike(vec bool, done chan<- error) func(*ServerStream) error {
	return func(st *ServerStream) error {
		err := func() error {
			for {
				msg, err := readMsg(st)
				if err == io.EOF {
					return nil
				}
				if err != nil {
					return err
				}
				resp := frameMsg(payload(int(binary.BigEndian.Uint32(msg))))
				if vec {
					err = st.WriteBuffers([][]byte{resp[:5], resp[5:]})
				} else if _, err = st.Write(resp); err == nil {
					err = st.Flush()
				}
				if err != nil {
					return err
				}
			}
		}()
		if done != nil {
			done <- err
		}
		return err
	}
}

// sizeRequest is a request message asking adsLike for n bytes.
func sizeRequest(n int) []byte {
	msg := make([]byte, 64)
	binary.BigEndian.PutUint32(msg, uint32(n))
	return frameMsg(msg)
}

// envoySettings are the SETTINGS Envoy's HTTP/2 codec sends as a client
// (Envoy's defaults: Http2ProtocolOptions; nghttp2/oghttp2 add
// NO_RFC7540_PRIORITIES), and envoyConnWindow its connection window.
var envoySettings = []http2.Setting{
	{ID: http2.SettingEnablePush, Val: 0},
	{ID: http2.SettingHeaderTableSize, Val: 4096},
	{ID: http2.SettingEnableConnectProtocol, Val: 0},
	{ID: http2.SettingMaxConcurrentStreams, Val: 2147483647},
	{ID: http2.SettingInitialWindowSize, Val: 268435456},
	{ID: http2.SettingNoRFC7540Priorities, Val: 1},
	{ID: 0xf0f0, Val: 7}, // unknown: ignored
}

const envoyConnWindow = 268435456

// TestServerEnvoyShapedADS drives an ADS stream with the frames Envoy's
// codec sends, and checks every frame of the answer as Envoy's codec would
// (rawClient): a split, padded, prioritised request header block; padded
// and empty DATA; an 8 MB response within windows and frame sizes; PING;
// SETTINGS_INITIAL_WINDOW_SIZE lowered (the response stalls at the new
// window) and raised (it resumes); SETTINGS_HEADER_TABLE_SIZE shrunk to 0
// (the next header block says so); a second stream; then Envoy's shutdown:
// RST_STREAM(CANCEL), GOAWAY(NO_ERROR), close.
func TestServerEnvoyShapedADS(t *testing.T) {
	for _, vec := range []bool{false, true} {
		name := "Write"
		if vec {
			name = "WriteBuffers"
		}
		t.Run(name, func(t *testing.T) {
			done := make(chan error, 2)
			_, path := startServer(t, ServerConfig{Handle: adsLike(vec, done)})
			rc := dialRaw(t, path, envoyConnWindow-65535, envoySettings...)
			rc.sync(false)

			// Request headers as Envoy's gRPC client sends them, cut into
			// HEADERS (PRIORITY flag, padding) and two CONTINUATIONs.
			block := rc.block(grpcRequest(adsMethod,
				hf("x-envoy-internal", "true"), hf("x-forwarded-for", "10.1.2.3"),
				hf("x-envoy-expected-rq-timeout-ms", "15000"), hf("user-agent", "envoy/1.36.0"),
				hf("x-request-id", "4b1c3f0e-1111-2222-3333-444455556666"))...)
			rc.stream(1)
			third := len(block) / 3
			rc.check(rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:third],
				Priority: http2.PriorityParam{Weight: 15}, PadLength: 5}))
			rc.check(rc.fr.WriteContinuation(1, false, block[third:2*third]))
			rc.check(rc.fr.WriteContinuation(1, true, block[2*third:]))

			// The first request over three DATA frames: padded, empty, rest.
			req := sizeRequest(8 << 20)
			rc.check(rc.fr.WriteDataPadded(1, false, req[:3], make([]byte, 10)))
			rc.check(rc.fr.WriteData(1, false, nil))
			rc.check(rc.fr.WriteData(1, false, req[3:]))
			rc.check(rc.fr.WritePing(false, [8]byte{1, 2, 3}))
			want := frameMsg(payload(8 << 20))
			if got := rc.body(1, len(want)); !bytes.Equal(got, want) {
				t.Fatalf("first response: %d bytes, differs from the %d sent", len(got), len(want))
			}
			if b := rc.streams[1].blocks; len(b) != 1 || b[0].end {
				t.Fatalf("response header blocks: %v", b)
			}
			// Envoy returns window as it consumes.
			rc.returnCredit(1, len(want))

			// Lower the stream windows: the next response stops at 16 KiB.
			rc.settings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 16384})
			rc.sync(false)
			rc.check(rc.fr.WriteData(1, false, sizeRequest(100000)))
			rc.body(1, len(want)+16384)
			rc.sync(false)
			if got := rc.streams[1].body.Len() - len(want); got != 16384 {
				t.Fatalf("second response: %d bytes before the window was raised, want 16384", got)
			}
			// Raise them: the rest flows (the window grows by the difference).
			rc.settings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
			want = append(want, frameMsg(payload(100000))...)
			if got := rc.body(1, len(want)); !bytes.Equal(got, want) {
				t.Fatal("second response differs")
			}

			// HPACK table shrunk to 0: the next header block says so first.
			rc.settings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
			rc.sync(false)
			rc.headers(3, false, grpcRequest(adsMethod, hf("x-envoy-internal", "true"))...)
			rc.check(rc.fr.WriteData(3, true, sizeRequest(10)))
			tr := rc.trailers(3)
			if first := rc.streams[3].blocks[0]; len(first.raw) == 0 || first.raw[0] != 0x20 {
				t.Errorf("first header block after HEADER_TABLE_SIZE=0 starts with % x, want a size update to 0 (20)", first.raw[:min(4, len(first.raw))])
			}
			if c, _ := tr.get("grpc-status"); c != "0" || rc.streams[3].body.Len() != 15 {
				t.Errorf("second stream: grpc-status %q, %d body bytes", c, rc.streams[3].body.Len())
			}
			if err := <-done; err != nil {
				t.Errorf("second stream's handler: %v", err)
			}

			// Envoy shuts down: cancel the ADS stream, GOAWAY, close.
			rc.check(rc.fr.WriteRSTStream(1, http2.ErrCodeCancel))
			rc.streams[1].reset = true
			if err := <-done; status.Code(err) != codes.Canceled {
				t.Errorf("ADS handler after RST_STREAM(CANCEL): %v, want Canceled", err)
			}
			rc.check(rc.fr.WriteGoAway(3, http2.ErrCodeNo, nil))
			rc.nc.(*net.UnixConn).CloseWrite()
			for {
				f, err := rc.read()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("after the client's GOAWAY: %v", err)
				}
				if g, ok := f.(*http2.GoAwayFrame); ok && g.ErrCode != http2.ErrCodeNo {
					t.Errorf("server answered the client's GOAWAY with GOAWAY(%v)", g.ErrCode)
				}
			}
			if len(rc.serverPings) > 0 {
				t.Errorf("server sent %d PINGs without keepalive configured", len(rc.serverPings))
			}
		})
	}
}

// TestServerDataFramesFollowMaxFrameSize: a client that raises
// SETTINGS_MAX_FRAME_SIZE may get larger DATA frames, never larger than it
// allowed; one that keeps the default never gets more than 16 KiB.
func TestServerDataFramesFollowMaxFrameSize(t *testing.T) {
	for _, size := range []uint32{16384, 65536, 1 << 20} {
		for _, vec := range []bool{false, true} {
			_, path := startServer(t, ServerConfig{Handle: adsLike(vec, nil)})
			rc := dialRaw(t, path, envoyConnWindow-65535, append(envoySettings, http2.Setting{ID: http2.SettingMaxFrameSize, Val: size})...)
			rc.sync(false)
			rc.headers(1, false, grpcRequest(adsMethod)...)
			rc.check(rc.fr.WriteData(1, true, sizeRequest(2<<20)))
			rc.trailers(1)
			// rawClient fails on any frame above the limit.
			if got := rc.streams[1].maxDataFrameLen; got > int(size) || got == 0 {
				t.Errorf("SETTINGS_MAX_FRAME_SIZE %d: largest DATA frame %d", size, got)
			}
		}
	}
}
