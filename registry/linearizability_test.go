package registry_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/registry/registrytest"
)

// The registry's record operations, recorded as several clients run them
// against a real 3-member etcd cluster while one member is killed, must be
// linearizable: porcupine checks the history against a model of one
// compare-and-swap register per agent. Every write stores a unique op id,
// so a record's value names the write that made it, and "the revision is
// still r" is "the value is still the one read at r".

type regInput struct {
	kind   string // get, create, update, delete
	key    string
	expect string // the op id the write expects ("" : absent)
	value  string // the op id it writes ("" for a delete)
}

type regOutput struct {
	ok      bool   // a write that took effect / a get that found a record
	value   string // what a get read
	unknown bool   // no answer: it may have taken effect
}

// registerModel is nondeterministic: a write without an answer may have
// taken effect (at any point after its call) or not at all.
var registerModel = (&porcupine.NondeterministicModel{
	Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		var keys []string
		for _, op := range h {
			k := op.Input.(regInput).key
			if _, ok := byKey[k]; !ok {
				keys = append(keys, k)
			}
			byKey[k] = append(byKey[k], op)
		}
		var out [][]porcupine.Operation
		for _, k := range keys {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() []any { return []any{""} },
	Step: func(state, input, output any) []any {
		st, in, out := state.(string), input.(regInput), output.(regOutput)
		switch {
		case in.kind == "get" && out.unknown:
			return []any{st}
		case in.kind == "get":
			if out.ok == (st != "") && out.value == st {
				return []any{st}
			}
			return nil
		case out.unknown:
			// It happened (possible only from its expected value) or not.
			if st == in.expect {
				return []any{st, in.value}
			}
			return []any{st}
		case out.ok:
			if st == in.expect {
				return []any{in.value}
			}
			return nil
		}
		// Refused: only when the value was not the expected one.
		if st != in.expect {
			return []any{st}
		}
		return nil
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(regInput), output.(regOutput)
		return fmt.Sprintf("%s %s %s->%s = %+v", in.kind, in.key, in.expect, in.value, out)
	},
}).ToModel()

func TestLinearizableOnCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("a 3-member cluster: not in -short")
	}
	members, url := registrytest.Cluster(t, 3)
	start := time.Now()
	var mu sync.Mutex
	var history []porcupine.Operation
	const clients, opsEach = 6, 60
	keys := []string{"k0", "k1", "k2"}
	far := int64(1 << 62) // an unanswered call returns "at the end of time"
	record := func(client int) func(registry.OpRecord) {
		return func(r registry.OpRecord) {
			in := regInput{kind: r.Kind, key: r.Name}
			if r.Prev != nil {
				in.expect = r.Prev.Op
			}
			if r.Next != nil {
				in.value = r.Next.Op
			}
			out := regOutput{}
			ret := r.Ret.Sub(start).Nanoseconds()
			switch {
			case r.Err == nil:
				out.ok = true
				if r.Out != nil && r.Kind == "get" {
					out.value = r.Out.Op
				}
			case errors.Is(r.Err, registry.ErrNotFound) && r.Kind == "get":
			case errors.Is(r.Err, registry.ErrConflict), errors.Is(r.Err, registry.ErrExists), errors.Is(r.Err, registry.ErrNotFound):
			default:
				out.unknown, ret = true, far
			}
			mu.Lock()
			history = append(history, porcupine.Operation{ClientId: client, Input: in, Call: r.Call.Sub(start).Nanoseconds(), Output: out, Return: ret})
			mu.Unlock()
		}
	}
	var wg sync.WaitGroup
	var killOnce sync.Once
	done := make(chan struct{}, clients*opsEach)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := registry.Open(url, registry.Options{OnOp: record(c), AttemptTimeout: 500 * time.Millisecond})
			if err != nil {
				t.Error(err)
				return
			}
			defer r.Close()
			ctx := context.Background()
			s, err := r.Register(ctx, registry.Host{ID: fmt.Sprintf("client-%d", c)}, 30*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			g := rand.New(rand.NewPCG(uint64(c), 7))
			seen := map[string]*registry.Agent{}
			for i := 0; i < opsEach; i++ {
				k := keys[g.IntN(len(keys))]
				octx, cancel := context.WithTimeout(ctx, 3*time.Second)
				switch x := g.IntN(10); {
				case x < 4:
					a, err := r.Agent(octx, k)
					if err == nil {
						seen[k] = a
					} else if errors.Is(err, registry.ErrNotFound) {
						delete(seen, k)
					}
				case seen[k] == nil || x == 9:
					r.Create(octx, s, registry.Agent{Name: k, Owner: s.HostID(), State: registry.StateRunning, Epoch: 1, Since: time.Unix(0, 0)})
				case x == 8:
					r.Delete(octx, s, seen[k])
					delete(seen, k)
				default:
					next := *seen[k]
					next.Epoch++
					next.Owner = s.HostID()
					r.Update(octx, s, seen[k], next)
					delete(seen, k)
				}
				cancel()
				done <- struct{}{}
				if len(done) == clients*opsEach/3 {
					// A third of the way in, kill a member (the others keep
					// a quorum).
					killOnce.Do(func() { members[1].Close() })
				}
			}
		}()
	}
	wg.Wait()
	if len(history) < clients*opsEach {
		t.Fatalf("recorded %d operations, want %d", len(history), clients*opsEach)
	}
	unknown := 0
	for _, op := range history {
		if op.Output.(regOutput).unknown {
			unknown++
		}
	}
	res := porcupine.CheckOperationsTimeout(registerModel, history, time.Minute)
	t.Logf("%d operations by %d clients, %d without an answer, one member killed: %s", len(history), clients, unknown, res)
	if res != porcupine.Ok {
		for _, part := range registerModel.Partition(history) {
			if porcupine.CheckOperations(registerModel, part) {
				continue
			}
			sort.Slice(part, func(i, j int) bool { return part[i].Call < part[j].Call })
			for _, op := range part {
				t.Logf("client %d [%d, %d] %s", op.ClientId, op.Call/1e6, op.Return/1e6, registerModel.DescribeOperation(op.Input, op.Output))
			}
			break
		}
		t.Fatalf("the registry's history is not linearizable: %s", res)
	}
}

// The checker itself rejects a history that is not linearizable (a read
// of a value after it was overwritten), so a pass above means something.
func TestLinearizabilityCheckerFires(t *testing.T) {
	h := []porcupine.Operation{
		{Input: regInput{kind: "create", key: "k", value: "a"}, Call: 0, Output: regOutput{ok: true}, Return: 1},
		{Input: regInput{kind: "update", key: "k", expect: "a", value: "b"}, Call: 2, Output: regOutput{ok: true}, Return: 3},
		{Input: regInput{kind: "get", key: "k"}, Call: 4, Output: regOutput{ok: true, value: "a"}, Return: 5},
	}
	if porcupine.CheckOperations(registerModel, h) {
		t.Fatal("a stale read passed the check")
	}
	h[2].Output = regOutput{ok: true, value: "b"}
	if !porcupine.CheckOperations(registerModel, h) {
		t.Fatal("a correct history failed the check")
	}
	// A write without an answer may not have happened: a later write that
	// needs it not to have happened is fine...
	far := int64(1 << 62)
	u := []porcupine.Operation{
		{Input: regInput{kind: "create", key: "k", value: "a"}, Call: 0, Output: regOutput{unknown: true}, Return: far},
		{Input: regInput{kind: "create", key: "k", value: "b"}, Call: 2, Output: regOutput{ok: true}, Return: 3},
		{Input: regInput{kind: "get", key: "k"}, Call: 4, Output: regOutput{ok: true, value: "b"}, Return: 5},
	}
	if !porcupine.CheckOperations(registerModel, u) {
		t.Fatal("a write without an answer was taken to have happened")
	}
	// ...but a refusal of a write that did happen is caught.
	u[0].Output, u[0].Return = regOutput{}, 1
	if porcupine.CheckOperations(registerModel, u[:1]) {
		t.Fatal("a create refused on an absent key passed the check")
	}
}
