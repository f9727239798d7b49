package dst

import (
	"hash/fnv"
	"math/rand/v2"
	"strconv"
)

// Stream returns the random stream of one component, forked from the root
// seed by the component's name. Forking by name (not by drawing from a
// shared generator) means adding draws to one component never shifts what
// another sees, and a replay that skips operations keeps the rest intact.
func Stream(root uint64, name string) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(name))
	n := h.Sum64()
	return rand.New(rand.NewPCG(splitmix(root^n), splitmix(root+0x9e3779b97f4a7c15^splitmix(n))))
}

// stepStream is the stream of one step's executor (fault decisions,
// latencies), keyed by the step the operation was generated at.
func stepStream(root uint64, step int) *rand.Rand {
	return Stream(root, "step/"+strconv.Itoa(step))
}

// splitmix is SplitMix64's finaliser: it spreads nearby seeds (1, 2, 3...)
// over the whole state space before they seed a PCG.
func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}
