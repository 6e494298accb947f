package testenv

import (
	"bytes"
	"sync"
)

// Buffer is a goroutine-safe output sink for processes a test starts: their
// stdout and stderr are written from exec's copying goroutines while the
// test reads them.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
