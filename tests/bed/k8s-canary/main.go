// Canary for the Kubernetes bundle builder (tests/bed/build-k8s-bundle.sh): built inside the
// Kubernetes tree (GOPATH mode, so it links the tree's vendored json-iterator and reflect2, after
// the builder's vendor overrides) with the Go that builds the bundle, it round-trips a custom
// resource as an unstructured map the way kube-apiserver does. With the tree's original reflect2
// v1.0.1 under Go >= 1.18 this dies with "fatal error: fault" (SIGSEGV in map iteration), which
// is how kube-apiserver crashed on custom resources.
package main

import (
	"bytes"
	"fmt"
	"os"

	jsoniter "github.com/json-iterator/go"
)

func main() {
	in := []byte(`{"apiVersion":"e2e.clusterctl.io/v1","kind":"Widget","metadata":{"labels":{"app":"w0"},"name":"w0"},"spec":{"labels":{"tier":"t0","zone":"z0"},"nested":{"a":{"b":{"c":[1,2,{"d":"e"}]}}}}}`)
	json := jsoniter.ConfigCompatibleWithStandardLibrary
	for i := 0; i < 1000; i++ {
		var obj map[string]interface{}
		if err := json.Unmarshal(in, &obj); err != nil {
			fmt.Fprintln(os.Stderr, "unmarshal:", err)
			os.Exit(1)
		}
		out, err := json.Marshal(obj)
		if err != nil {
			fmt.Fprintln(os.Stderr, "marshal:", err)
			os.Exit(1)
		}
		if !bytes.Equal(out, in) {
			fmt.Fprintf(os.Stderr, "round trip changed the object:\n%s\n%s\n", in, out)
			os.Exit(1)
		}
	}
	fmt.Println("json-iterator map round trip ok")
}
