package mem_test

import (
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/store/mem"
	"github.com/kelpie/teleport/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) teleport.Store { return mem.New() })
}

func TestChunkConformance(t *testing.T) {
	storetest.RunChunks(t, storetest.ChunkHarness{Grace: time.Hour, RealTime: true,
		New: func(t *testing.T) (teleport.Store, func(time.Duration)) { return mem.New(), nil }})
}
