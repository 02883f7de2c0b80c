// Package bundle names the files of a guest OS bundle, shared by the
// build pipeline (cmlsign), the device (the guest OS store) and the
// verifier (reference bundles). It holds names only, no code.
package bundle

// ManifestFile is the guest OS manifest in a bundle; next to it are its
// detached signature (.sig) and signer chain (.cert).
const ManifestFile = "guestos.conf"

// HashFileSuffix names an image's dm-verity hash file: root.img.verity.
const HashFileSuffix = ".verity"
