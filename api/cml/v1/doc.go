// Package cmlv1 is cmld's control API and the config messages it shares
// with GyroidOS (container and device configs, guest OS manifests),
// generated from cml.proto by `make generate`. Only this file is written
// by hand.
package cmlv1
