package logging

import "os"

// stderr writes to the process's current os.Stderr, so tests that swap it see
// the output.
type stderr struct{}

func (stderr) Write(p []byte) (int, error) { return os.Stderr.Write(p) }
