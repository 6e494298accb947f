package h2grpc

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// validStart is a client preface, SETTINGS, and an open stream with a message.
func validStart() []byte {
	var b bytes.Buffer
	b.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: echoMethod}, {Name: ":authority", Value: "x"}, {Name: "content-type", Value: "application/grpc"}} {
		enc.WriteField(f)
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true})
	fr.WriteData(1, false, frameMsg([]byte("hello")))
	return b.Bytes()
}

// FuzzServerConn feeds arbitrary bytes after a valid start into a server
// connection: it must neither panic nor hang.
func FuzzServerConn(f *testing.F) {
	var seed bytes.Buffer
	fr := http2.NewFramer(&seed, nil)
	fr.WriteData(1, true, frameMsg([]byte("bye")))
	fr.WritePing(false, [8]byte{1})
	fr.WriteWindowUpdate(0, 1000)
	fr.WriteRSTStream(1, http2.ErrCodeCancel)
	fr.WriteGoAway(1, http2.ErrCodeNo, nil)
	f.Add(seed.Bytes())
	f.Add([]byte{0, 0, 4, 9, 4, 0, 0, 0, 1, 0x82, 0x84, 0x86, 0x41}) // stray CONTINUATION
	f.Add([]byte{0, 0, 1, 0, 8, 0, 0, 0, 1, 200})                    // padding longer than the frame
	f.Fuzz(func(t *testing.T, data []byte) {
		s := NewServer(ServerConfig{Handle: echo})
		client, server := net.Pipe()
		sc := s.newServerConn(server)
		s.mu.Lock()
		s.conns[sc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go sc.serve()
		drained := make(chan struct{})
		go func() { io.Copy(io.Discard, client); close(drained) }()
		client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		client.Write(validStart())
		client.Write(data)
		client.Close()
		stopped := make(chan struct{})
		go func() { s.Stop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			t.Fatal("server connection hung")
		}
		<-drained
	})
}
