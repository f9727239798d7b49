package firecracker

import (
	"fmt"
	"os"
	"testing"
)

// fakeBinaryEnv makes the test binary behave as a firecracker executable
// (the fake of fakefc_test.go in its own process), so the real launcher
// and host probe run against a process they start themselves.
const fakeBinaryEnv = "KELPIE_TEST_FAKE_FIRECRACKER"

// fakeBinaryVersion is what the fake binary reports.
const fakeBinaryVersion = "1.7.0"

func TestMain(m *testing.M) {
	if os.Getenv(fakeBinaryEnv) == "1" {
		os.Exit(fakeFirecrackerMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeFirecrackerMain implements the command line Kelpie uses:
// --version, and --api-sock PATH --id ID (PATH relative to the working
// directory, as the launcher passes it).
func fakeFirecrackerMain(args []string) int {
	api := ""
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "--version":
			fmt.Printf("Firecracker v%s\n\n", fakeBinaryVersion)
			return 0
		case "--api-sock", "--id":
			if i+1 >= len(args) {
				fmt.Fprintf(os.Stderr, "Arguments parsing error: %s needs a value\n", args[i])
				return 1
			}
			if args[i] == "--api-sock" {
				api = args[i+1]
			}
			i++
		default:
			fmt.Fprintf(os.Stderr, "Arguments parsing error: unknown argument %q\n", args[i])
			return 1
		}
	}
	if api != apiSocketName {
		fmt.Fprintf(os.Stderr, "the fake serves its API on %s only, got %q\n", apiSocketName, api)
		return 1
	}
	dir, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fc, err := startFakeFC(nil, dir, fakeBinaryVersion)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("fake firecracker: serving", api)
	<-fc.done()
	fmt.Fprintln(os.Stderr, "fake firecracker: exiting:", fc.exitReason())
	return 1
}
