package firecracker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
)

// The parts of Firecracker's published API definition that Kelpie uses,
// encoded from src/firecracker/swagger/firecracker.yaml (Firecracker main,
// spec version 1.17.0-dev; the operations below are unchanged since 1.1.0
// except where noted). Every request the backend sends in tests is checked
// against this table by the fake Firecracker in fakefc_test.go.

type jsonType string

const (
	tString  jsonType = "string"
	tInteger jsonType = "integer"
	tBoolean jsonType = "boolean"
	tObject  jsonType = "object"
	tArray   jsonType = "array"
)

type property struct {
	typ      jsonType
	enum     []string
	min, max *int64
	ref      string // definition of an object property
}

type definition struct {
	required []string
	props    map[string]property
	// oneOf lists property groups of which exactly one must be present
	// (the spec states these in descriptions, not in schema).
	oneOf [][]string
}

func i64(n int64) *int64 { return &n }

var definitions = map[string]definition{
	"InstanceActionInfo": {
		required: []string{"action_type"},
		props: map[string]property{
			"action_type": {typ: tString, enum: []string{"FlushMetrics", "InstanceStart", "SendCtrlAltDel"}},
		},
	},
	"BootSource": {
		required: []string{"kernel_image_path"},
		props: map[string]property{
			"boot_args":         {typ: tString},
			"initrd_path":       {typ: tString},
			"kernel_image_path": {typ: tString},
		},
	},
	"Drive": {
		required: []string{"drive_id", "is_root_device"},
		props: map[string]property{
			"drive_id":       {typ: tString},
			"partuuid":       {typ: tString},
			"is_root_device": {typ: tBoolean},
			"cache_type":     {typ: tString, enum: []string{"Unsafe", "Writeback"}},
			"is_read_only":   {typ: tBoolean},
			"path_on_host":   {typ: tString},
			"rate_limiter":   {typ: tObject, ref: "RateLimiter"},
			"io_engine":      {typ: tString, enum: []string{"Sync", "Async"}},
			"socket":         {typ: tString},
		},
	},
	"RateLimiter": {
		props: map[string]property{
			"bandwidth": {typ: tObject, ref: "TokenBucket"},
			"ops":       {typ: tObject, ref: "TokenBucket"},
		},
	},
	"TokenBucket": {
		required: []string{"refill_time", "size"},
		props: map[string]property{
			"one_time_burst": {typ: tInteger, min: i64(0)},
			"refill_time":    {typ: tInteger, min: i64(0)},
			"size":           {typ: tInteger, min: i64(0)},
		},
	},
	"MachineConfiguration": {
		required: []string{"mem_size_mib", "vcpu_count"},
		props: map[string]property{
			"cpu_template":      {typ: tString, enum: []string{"C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"}},
			"smt":               {typ: tBoolean},
			"mem_size_mib":      {typ: tInteger},
			"track_dirty_pages": {typ: tBoolean},
			"vcpu_count":        {typ: tInteger, min: i64(1), max: i64(32)},
			"huge_pages":        {typ: tString, enum: []string{"None", "Transparent", "2M"}},
		},
	},
	"SnapshotCreateParams": {
		required: []string{"mem_file_path", "snapshot_path"},
		props: map[string]property{
			"mem_file_path": {typ: tString},
			"snapshot_path": {typ: tString},
			"snapshot_type": {typ: tString, enum: []string{"Full", "Diff"}},
		},
	},
	// Since 1.1.0: mem_backend added, mem_file_path deprecated, and
	// "exactly one of the two mem_* fields must be present".
	"SnapshotLoadParams": {
		required: []string{"snapshot_path"},
		props: map[string]property{
			"enable_diff_snapshots": {typ: tBoolean},
			"track_dirty_pages":     {typ: tBoolean},
			"mem_file_path":         {typ: tString},
			"mem_backend":           {typ: tObject, ref: "MemoryBackend"},
			"snapshot_path":         {typ: tString},
			"resume_vm":             {typ: tBoolean},
			"network_overrides":     {typ: tArray},
			"vsock_override":        {typ: tObject, ref: "VsockOverride"},
			"clock_realtime":        {typ: tBoolean},
		},
		oneOf: [][]string{{"mem_file_path", "mem_backend"}},
	},
	"MemoryBackend": {
		required: []string{"backend_type", "backend_path"},
		props: map[string]property{
			"backend_type": {typ: tString, enum: []string{"File", "Uffd"}},
			"backend_path": {typ: tString},
		},
	},
	"VsockOverride": {
		required: []string{"uds_path"},
		props:    map[string]property{"uds_path": {typ: tString}},
	},
	"Vm": {
		required: []string{"state"},
		props:    map[string]property{"state": {typ: tString, enum: []string{"Paused", "Resumed"}}},
	},
	"Vsock": {
		required: []string{"guest_cid", "uds_path"},
		props: map[string]property{
			"guest_cid": {typ: tInteger, min: i64(3)},
			"uds_path":  {typ: tString},
			"vsock_id":  {typ: tString},
		},
	},
	"InstanceInfo": {
		required: []string{"app_name", "id", "state", "vmm_version"},
		props: map[string]property{
			"app_name":    {typ: tString},
			"id":          {typ: tString},
			"state":       {typ: tString, enum: []string{"Not started", "Running", "Paused"}},
			"vmm_version": {typ: tString},
		},
	},
	"FirecrackerVersion": {
		required: []string{"firecracker_version"},
		props:    map[string]property{"firecracker_version": {typ: tString}},
	},
	"Error": {
		props: map[string]property{"fault_message": {typ: tString}},
	},
}

// operation is one method on one path. Every operation's error responses
// are 400 or "default", both with an Error body.
type operation struct {
	method       string
	path         string // with {param} segments
	body         string // definition of the request body; "" = none
	bodyRequired bool
	okStatus     int
	okBody       string // definition of the success body; "" = none
}

var operations = []operation{
	{http.MethodGet, "/", "", false, http.StatusOK, "InstanceInfo"},
	{http.MethodPut, "/actions", "InstanceActionInfo", true, http.StatusNoContent, ""},
	{http.MethodPut, "/boot-source", "BootSource", true, http.StatusNoContent, ""},
	{http.MethodPut, "/drives/{drive_id}", "Drive", true, http.StatusNoContent, ""},
	{http.MethodGet, "/machine-config", "", false, http.StatusOK, "MachineConfiguration"},
	// The spec does not mark this body required; Firecracker rejects an
	// empty PUT anyway ("Empty PUT request.").
	{http.MethodPut, "/machine-config", "MachineConfiguration", false, http.StatusNoContent, ""},
	{http.MethodPut, "/snapshot/create", "SnapshotCreateParams", true, http.StatusNoContent, ""},
	{http.MethodPut, "/snapshot/load", "SnapshotLoadParams", true, http.StatusNoContent, ""},
	{http.MethodGet, "/version", "", false, http.StatusOK, "FirecrackerVersion"},
	{http.MethodPatch, "/vm", "Vm", true, http.StatusNoContent, ""},
	{http.MethodPut, "/vsock", "Vsock", true, http.StatusNoContent, ""},
}

// findOperation matches a request path against the table; params holds
// the {param} values.
func findOperation(method, path string) (*operation, map[string]string) {
	segs := strings.Split(strings.TrimPrefix(path, "/"), "/")
	for i := range operations {
		op := &operations[i]
		if op.method != method {
			continue
		}
		tsegs := strings.Split(strings.TrimPrefix(op.path, "/"), "/")
		if len(tsegs) != len(segs) {
			continue
		}
		params := map[string]string{}
		ok := true
		for j, ts := range tsegs {
			if strings.HasPrefix(ts, "{") && strings.HasSuffix(ts, "}") {
				if segs[j] == "" {
					ok = false
					break
				}
				params[strings.Trim(ts, "{}")] = segs[j]
				continue
			}
			if ts != segs[j] {
				ok = false
				break
			}
		}
		if ok {
			return op, params
		}
	}
	return nil, nil
}

// checkRequest lists every way a request breaks the API definition.
func checkRequest(method, path, contentType string, body []byte) (*operation, []string) {
	op, _ := findOperation(method, path)
	if op == nil {
		return nil, []string{fmt.Sprintf("no operation %s %s in the API definition", method, path)}
	}
	var problems []string
	empty := len(bytes.TrimSpace(body)) == 0
	switch {
	case op.body == "" && !empty:
		problems = append(problems, fmt.Sprintf("%s %s takes no body", method, op.path))
	case op.body != "" && empty:
		problems = append(problems, fmt.Sprintf("%s %s needs a %s body", method, op.path, op.body))
	case op.body != "":
		if !strings.HasPrefix(contentType, "application/json") {
			problems = append(problems, fmt.Sprintf("Content-Type %q, the API consumes application/json", contentType))
		}
		var v any
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		if err := dec.Decode(&v); err != nil {
			problems = append(problems, fmt.Sprintf("body is not JSON: %v", err))
			break
		}
		problems = append(problems, checkValue(op.body, v, "body")...)
	}
	return op, problems
}

// checkValue checks v against definition name. Unknown properties are
// errors: Firecracker's request types deny unknown fields.
func checkValue(name string, v any, where string) []string {
	def, ok := definitions[name]
	if !ok {
		return []string{fmt.Sprintf("%s: definition %s missing from the table", where, name)}
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return []string{fmt.Sprintf("%s: %s must be an object, got %T", where, name, v)}
	}
	var problems []string
	for _, r := range def.required {
		if _, ok := obj[r]; !ok {
			problems = append(problems, fmt.Sprintf("%s: %s.%s is required", where, name, r))
		}
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		p, ok := def.props[k]
		if !ok {
			problems = append(problems, fmt.Sprintf("%s: %s has no property %q", where, name, k))
			continue
		}
		problems = append(problems, checkProperty(p, obj[k], where+"."+k)...)
	}
	for _, group := range def.oneOf {
		n := 0
		for _, k := range group {
			if _, ok := obj[k]; ok {
				n++
			}
		}
		if n != 1 {
			problems = append(problems, fmt.Sprintf("%s: exactly one of %s must be present, got %d", where, strings.Join(group, ", "), n))
		}
	}
	return problems
}

func checkProperty(p property, v any, where string) []string {
	switch p.typ {
	case tString:
		s, ok := v.(string)
		if !ok {
			return []string{fmt.Sprintf("%s must be a string, got %s", where, jsonKind(v))}
		}
		if len(p.enum) > 0 && !slices.Contains(p.enum, s) {
			return []string{fmt.Sprintf("%s is %q, not one of %s", where, s, strings.Join(p.enum, ", "))}
		}
	case tBoolean:
		if _, ok := v.(bool); !ok {
			return []string{fmt.Sprintf("%s must be a boolean, got %s", where, jsonKind(v))}
		}
	case tInteger:
		n, ok := v.(json.Number)
		if !ok {
			return []string{fmt.Sprintf("%s must be an integer, got %s", where, jsonKind(v))}
		}
		i, err := n.Int64()
		if err != nil {
			return []string{fmt.Sprintf("%s must be an integer, got %s", where, n)}
		}
		if p.min != nil && i < *p.min {
			return []string{fmt.Sprintf("%s is %d, minimum %d", where, i, *p.min)}
		}
		if p.max != nil && i > *p.max {
			return []string{fmt.Sprintf("%s is %d, maximum %d", where, i, *p.max)}
		}
	case tArray:
		if _, ok := v.([]any); !ok {
			return []string{fmt.Sprintf("%s must be an array, got %s", where, jsonKind(v))}
		}
	case tObject:
		return checkValue(p.ref, v, where)
	}
	return nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}
