package dst

import (
	"testing"
	"time"

	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/registry/registrytest"
)

// The simulation's registry model passes the same conformance suite as
// the etcd registry: the protocol code cannot tell them apart.
func TestRegistryModelConformance(t *testing.T) {
	registrytest.Run(t, registrytest.Harness{
		New: func(t *testing.T) registry.Registry { return NewRegistry(NewClock()) },
		Expire: func(t *testing.T, r registry.Registry, s registry.Session) {
			r.(*Registry).clock.Advance(time.Minute)
		},
	})
}
