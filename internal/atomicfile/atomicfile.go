// Package atomicfile replaces small files whole: a reader, or a process
// that starts after a crash, sees the old contents or the new, never a
// torn mix. It is for records (a VM's state, a suspended VM's record, a
// probe verdict), not for snapshots, which stream.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Durability says whether a write must survive a power cut, not only a
// crash of the writing process.
type Durability bool

// The two durabilities.
const (
	// Crash: the rename makes the write atomic; the data may be lost with
	// the machine's power (records rewritten often, that a restart
	// re-derives).
	Crash Durability = false
	// Sync: the data is synced before the rename and the directory after
	// it: once WriteFile returns, the new contents survive a power cut.
	Sync Durability = true
)

// WriteFile makes path hold exactly b, with permissions perm, through a
// temporary sibling renamed over it. The directory is created if missing.
func WriteFile(path string, b []byte, perm os.FileMode, d Durability) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(b); err != nil {
		return err
	}
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if d == Sync {
		if err = tmp.Sync(); err != nil {
			return err
		}
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if d == Sync {
		return SyncDir(dir)
	}
	return nil
}

// SyncDir makes the entries of dir (a rename, a removal) durable.
func SyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
