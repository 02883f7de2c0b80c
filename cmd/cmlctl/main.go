// Command cmlctl manages cmld over its local control socket.
package main

import (
	"fmt"
	"os"

	"google.golang.org/grpc/status"

	"github.com/cmlproject/cml/internal/cli"
)

func main() {
	code, err := cli.Run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	if err != nil {
		msg := err.Error()
		if s, ok := status.FromError(err); ok {
			msg = s.Message()
		}
		fmt.Fprintln(os.Stderr, "cmlctl:", msg)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}
