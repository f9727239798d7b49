//go:build !linux

package agent

import (
	"context"
	"errors"
)

var errUnsupported = &RemoteError{Code: CodeUnsupported, Message: "not supported on this platform"}

func (s *Server) exec(ctx context.Context, a *ExecRequest) (*ExecResult, error) {
	return nil, errUnsupported
}

func doSync() error { return errUnsupported }

func setTime(int64) error { return errors.New("agent: set_time not supported on this platform") }

func reseedRNG([]byte) error { return errUnsupported }

func readClocks() (*TimeResult, error) { return nil, errUnsupported }

func sethostname(string) error { return errUnsupported }
