package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/vm"
)

// Error is the body of every error answer: one line saying what is wrong
// and what to do, and a stable code.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// badRequest is a mistake in the request itself.
type badRequest struct {
	status int
	msg    string
}

func (b *badRequest) Error() string { return b.msg }

func badf(format string, args ...any) error {
	return &badRequest{status: http.StatusBadRequest, msg: fmt.Sprintf(format, args...)}
}

// classify maps an error to its HTTP status and code. The order matters:
// the most specific category first.
func classify(err error) (int, string) {
	var b *badRequest
	if errors.As(err, &b) {
		switch b.status {
		case http.StatusRequestEntityTooLarge:
			return b.status, "too_large"
		case http.StatusUnsupportedMediaType:
			return b.status, "unsupported_media_type"
		case http.StatusUnauthorized:
			return b.status, "unauthorized"
		case http.StatusMethodNotAllowed:
			return b.status, "method_not_allowed"
		case http.StatusNotFound:
			return b.status, "not_found"
		}
		return b.status, "bad_request"
	}
	var refusal *teleport.RefusalError
	switch {
	case errors.As(err, &refusal):
		return http.StatusUnprocessableEntity, "refused"
	case errors.Is(err, registry.ErrLeaseLost):
		return http.StatusServiceUnavailable, "lease_lost"
	case errors.Is(err, registry.ErrUnavailable):
		return http.StatusServiceUnavailable, "registry_unavailable"
	case errors.Is(err, registry.ErrRunsElsewhere):
		return http.StatusConflict, "runs_elsewhere"
	case errors.Is(err, registry.ErrConflict):
		return http.StatusConflict, "conflict"
	case errors.Is(err, registry.ErrOutcomeUnknown), errors.Is(err, service.ErrOutcomeUnknown):
		return http.StatusConflict, "outcome_unknown"
	case errors.Is(err, service.ErrFenced):
		return http.StatusConflict, "fenced"
	case errors.Is(err, registry.ErrWrongState), errors.Is(err, vm.ErrInvalidState):
		return http.StatusConflict, "wrong_state"
	case errors.Is(err, registry.ErrExists), errors.Is(err, vm.ErrAlreadyExists), errors.Is(err, teleport.ErrAlreadyExists):
		return http.StatusConflict, "exists"
	case errors.Is(err, registry.ErrNotFound), errors.Is(err, vm.ErrNotFound), errors.Is(err, teleport.ErrNotFound):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, vm.ErrInvalidConfig), errors.Is(err, teleport.ErrInvalidID), errors.Is(err, teleport.ErrInvalidPackage),
		errors.Is(err, host.ErrUnknownBackend):
		return http.StatusBadRequest, "bad_request"
	case errors.Is(err, teleport.ErrArchMismatch), errors.Is(err, teleport.ErrVersionMismatch), errors.Is(err, teleport.ErrHostMismatch),
		errors.Is(err, teleport.ErrBackendMismatch), errors.Is(err, teleport.ErrChecksumMismatch):
		return http.StatusUnprocessableEntity, "refused"
	case errors.Is(err, vm.ErrUnsupported):
		return http.StatusUnprocessableEntity, "unsupported"
	}
	return http.StatusInternalServerError, "internal"
}

// reason is the failure label of the metrics: the error's code.
func reason(err error) string {
	_, code := classify(err)
	return code
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(Error{Error: "encode the answer: " + err.Error(), Code: "internal"})
	}
	w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, err error) {
	status, code := classify(err)
	writeJSON(w, status, Error{Error: oneLine(err.Error()), Code: code})
}
