package blob

import (
	"errors"
	"os"
	"syscall"
)

const seekData = 3 // SEEK_DATA

// nextData returns the first offset at or after off where f holds data,
// or ok false when only a hole remains. A filesystem without SEEK_DATA
// reports data everywhere.
func nextData(f *os.File, off int64) (int64, bool) {
	d, err := syscall.Seek(int(f.Fd()), off, seekData)
	switch {
	case errors.Is(err, syscall.ENXIO):
		return 0, false
	case err != nil:
		return off, true
	}
	return d, true
}
