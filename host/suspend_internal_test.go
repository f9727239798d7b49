package host

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/kelpie/teleport/vm"
)

// The suspend record is replaced whole: `vm resume` (or a crash recovery)
// reading it while it is rewritten never finds it torn. os.WriteFile,
// which truncates first, fails this.
func TestSuspendRecordIsNeverTorn(t *testing.T) {
	h, err := Open(context.Background(), Options{Home: t.TempDir(), Backends: []Backend{SimBackend()}})
	if err != nil {
		t.Fatal(err)
	}
	rec := &suspendRecord{Name: "agent", State: recordSuspending, Backend: "sim", PackageID: "suspend-agent-1",
		Store: strings.Repeat("/long/store/path", 64), Config: vm.Config{VCPUs: 1, MemoryMiB: 256}}
	os.MkdirAll(h.suspendedDir(), 0o755)
	if err := h.writeSuspended(rec); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	bad := make(chan error, 1)
	go func() {
		defer close(bad)
		for {
			select {
			case <-done:
				return
			default:
			}
			if _, err := h.readSuspended("agent"); err != nil {
				bad <- err
				return
			}
		}
	}()
	for i := 0; i < 300; i++ {
		rec.State = []string{recordSuspending, recordSuspended}[i%2]
		if err := h.writeSuspended(rec); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	if err, ok := <-bad; ok {
		t.Fatalf("a reader found the record torn: %v", err)
	}
}
