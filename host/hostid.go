package host

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kelpie/teleport/internal/atomicfile"
)

const hostIDFile = "host-id"

// loadHostID returns the home's stable host id, making one on first use.
// Two kelpies making it at once agree on one: the id is published with a
// hard link, which fails if the other was first.
func loadHostID(home string) (string, error) {
	p := filepath.Join(home, hostIDFile)
	if id, err := readHostID(p); err == nil {
		return id, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	var b [8]byte
	rand.Read(b[:])
	id := "host-" + hex.EncodeToString(b[:])
	tmp, err := os.CreateTemp(home, "."+hostIDFile+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("host id: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(id + "\n")
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("host id: %w", err)
	}
	if err := os.Link(tmp.Name(), p); err != nil {
		if other, rerr := readHostID(p); rerr == nil {
			return other, nil
		}
		return "", fmt.Errorf("host id: %w", err)
	}
	atomicfile.SyncDir(home)
	return id, nil
}

func readHostID(p string) (string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", fmt.Errorf("host id file %s is empty: %w", p, os.ErrNotExist)
	}
	return id, nil
}
