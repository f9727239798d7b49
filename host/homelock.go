package host

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kelpie/teleport/internal/atomicfile"
)

// A home is driven either by one daemon or by CLI commands, never both:
// two processes must never fight over one VM. The daemon holds an
// exclusive lock on Home/serve.lock while it serves; each CLI command
// holds a shared one while it runs. The lock is the kernel's (flock), so it
// goes with the process that held it, however it ended.

// ErrServed: a daemon serves the home; go through it (--server).
var ErrServed = errors.New("a kelpie daemon serves this home")

// ErrHomeBusy: the daemon cannot take a home while CLI commands use it.
var ErrHomeBusy = errors.New("kelpie commands are using this home")

// ServeInfo is what a daemon records about itself in Home/serve.json.
type ServeInfo struct {
	PID    int    `json:"pid"`
	URL    string `json:"url"`
	HostID string `json:"host_id"`
}

// HomeLock is a held lock on a home; Release it when done.
type HomeLock struct{ f *os.File }

// Release lets the home go.
func (l *HomeLock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}

func lockPath(home string) string { return filepath.Join(home, "serve.lock") }
func infoPath(home string) string { return filepath.Join(home, "serve.json") }

func openLock(home string) (*os.File, error) {
	if err := os.MkdirAll(home, 0o755); err != nil {
		return nil, err
	}
	return os.OpenFile(lockPath(home), os.O_CREATE|os.O_RDWR, 0o644)
}

// UseHome is the CLI's lock: shared with other commands, refused with
// ErrServed (naming the daemon's URL) while a daemon serves the home.
func UseHome(home string) (*HomeLock, error) {
	f, err := openLock(home)
	if err != nil {
		return nil, fmt.Errorf("home %s: %w", home, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			where := "its daemon"
			if info, ierr := ReadServeInfo(home); ierr == nil {
				where = fmt.Sprintf("the daemon at %s (pid %d)", info.URL, info.PID)
			}
			return nil, fmt.Errorf("home %s is served by %s: run the command with --server %s (or set KELPIE_SERVER): %w",
				home, where, urlOr(home), ErrServed)
		}
		return nil, fmt.Errorf("lock home %s: %w", home, err)
	}
	return &HomeLock{f: f}, nil
}

func urlOr(home string) string {
	if info, err := ReadServeInfo(home); err == nil && info.URL != "" {
		return info.URL
	}
	return "URL"
}

// ServeHome is the daemon's lock: exclusive, refused with ErrServed when
// another daemon serves the home and ErrHomeBusy while CLI commands run.
// info is recorded for the CLI's refusals.
func ServeHome(home string, info ServeInfo) (*HomeLock, error) {
	f, err := openLock(home)
	if err != nil {
		return nil, fmt.Errorf("home %s: %w", home, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			if prev, ierr := ReadServeInfo(home); ierr == nil && processAlive(prev.PID) {
				return nil, fmt.Errorf("home %s: the daemon at %s (pid %d) serves it: %w", home, prev.URL, prev.PID, ErrServed)
			}
			return nil, fmt.Errorf("home %s: wait for the kelpie commands using it to finish: %w", home, ErrHomeBusy)
		}
		return nil, fmt.Errorf("lock home %s: %w", home, err)
	}
	b, _ := json.Marshal(info)
	if err := atomicfile.WriteFile(infoPath(home), append(b, '\n'), 0o644, atomicfile.Sync); err != nil {
		f.Close()
		return nil, fmt.Errorf("home %s: %w", home, err)
	}
	return &HomeLock{f: f}, nil
}

// ReadServeInfo reads what the home's daemon (or its last one) recorded.
func ReadServeInfo(home string) (*ServeInfo, error) {
	b, err := os.ReadFile(infoPath(home))
	if err != nil {
		return nil, err
	}
	var info ServeInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

func processAlive(pid int) bool {
	return pid > 0 && syscall.Kill(pid, 0) == nil
}
