//go:build !linux

package blob

import "os"

// nextData reports data everywhere: holes are found by reading here.
func nextData(f *os.File, off int64) (int64, bool) { return off, true }
