package hostvmtest

import (
	"testing"
)

func TestMemoryRoundTrip(t *testing.T) {
	g := NewKVGuest()
	g.run("set", []string{"a", "1"})
	g.run("set", []string{"b", ""})
	mem, err := g.Memory(4096)
	if err != nil || len(mem) != 4096 {
		t.Fatalf("memory: %d bytes, %v", len(mem), err)
	}
	h := NewKVGuest()
	if err := h.LoadMemory(mem); err != nil {
		t.Fatal(err)
	}
	if out, code, _ := h.run("get", []string{"a"}); out != "1\n" || code != 0 {
		t.Fatalf("get a: %q %d", out, code)
	}
	// What follows the entries is unused RAM: restored, not read.
	if err := NewKVGuest().LoadMemory(append(append([]byte{}, mem[:40]...), 1)); err != nil {
		t.Fatalf("bytes in unused RAM refused: %v", err)
	}
	if _, err := g.Memory(8); err == nil {
		t.Fatal("an image larger than the RAM was accepted")
	}
	for name, bad := range map[string][]byte{
		"empty":         nil,
		"no magic":      []byte("XXXXXXXX\x00\x00\x00\x00"),
		"truncated":     mem[:20],
		"length beyond": append([]byte("SIMM"), 1, 0, 0, 0, 255, 255, 255, 255),
	} {
		if err := NewKVGuest().LoadMemory(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
