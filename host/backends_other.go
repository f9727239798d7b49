//go:build !linux

package host

// firecrackerBackend: Firecracker runs on Linux only.
func firecrackerBackend(FirecrackerConfig) (Backend, bool) { return Backend{}, false }
