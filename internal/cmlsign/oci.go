package cmlsign

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"
)

// OCIImage is what a guest OS takes from an OCI image's config.
type OCIImage struct {
	Init   string
	Params []string
	Env    []string
}

// UnpackOCI flattens the image at src (an OCI image layout directory, or a
// docker save tarball) into the empty directory dst, applying every layer
// in order with whiteouts, and returns its entrypoint and environment.
// Entries that would leave dst (absolute or .. paths, paths through a
// symlink, hard links outside) are refused: the image is not trusted.
func UnpackOCI(src, ref, dst string) (*OCIImage, error) {
	img, err := openImage(src, ref)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("%s: image config: %w", src, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", src, err)
	}
	for i, l := range layers {
		if err := applyLayer(l, dst); err != nil {
			return nil, fmt.Errorf("%s: layer %d: %w", src, i+1, err)
		}
	}
	out := &OCIImage{Env: cf.Config.Env}
	argv := append(append([]string{}, cf.Config.Entrypoint...), cf.Config.Cmd...)
	if len(argv) > 0 && strings.HasPrefix(argv[0], "/") {
		out.Init, out.Params = argv[0], argv[1:]
	}
	return out, nil
}

func openImage(src, ref string) (v1.Image, error) {
	st, err := os.Stat(src)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return tarball.ImageFromPath(src, nil)
	}
	idx, err := layout.ImageIndexFromPath(src)
	if err != nil {
		return nil, err
	}
	return pickImage(idx, ref)
}

// pickImage selects the image named ref (or the only one) from an index,
// descending into nested indexes for this machine's platform.
func pickImage(idx v1.ImageIndex, ref string) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var cands []v1.Descriptor
	for _, d := range im.Manifests {
		name := d.Annotations["org.opencontainers.image.ref.name"]
		if ref == "" || name == ref || strings.HasSuffix(name, ":"+ref) {
			cands = append(cands, d)
		}
	}
	if len(cands) > 1 {
		var plat []v1.Descriptor
		for _, d := range cands {
			if d.Platform == nil || (d.Platform.OS == "linux" && d.Platform.Architecture == runtime.GOARCH) {
				plat = append(plat, d)
			}
		}
		cands = plat
	}
	switch {
	case len(cands) == 0:
		return nil, fmt.Errorf("no image %q in the layout", ref)
	case len(cands) > 1:
		return nil, fmt.Errorf("the layout holds %d images; choose one with --oci-ref", len(cands))
	}
	d := cands[0]
	if d.MediaType.IsIndex() {
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, err
		}
		return pickImage(child, "")
	}
	return idx.Image(d.Digest)
}

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// applyLayer applies one layer on top of root: first its whiteouts, which
// delete from the layers below (a ".wh.name" entry removes name, an opaque
// marker empties its directory), then its files.
func applyLayer(l v1.Layer, root string) error {
	for pass := 0; pass < 2; pass++ {
		rc, err := l.Uncompressed()
		if err != nil {
			return err
		}
		err = extractTar(tar.NewReader(rc), root, pass == 0)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// removeBelow deletes rel under root if it exists, never following a
// symlink on the way.
func removeBelow(root, rel string) error {
	if err := ensureParents(root, rel); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(root, rel))
}

// extractTar writes one layer's tar stream into root: with whiteouts only
// its deletions, else its files.
func extractTar(tr *tar.Reader, root string, whiteouts bool) error {
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		rel, err := safeRel(h.Name)
		if err != nil {
			return err
		}
		if rel == "." {
			continue
		}
		base := path.Base(rel)
		if whiteouts {
			switch {
			case base == opaqueMarker:
				dir := path.Dir(rel)
				if err := ensureParents(root, path.Join(dir, "x")); err != nil {
					return err
				}
				ents, _ := os.ReadDir(filepath.Join(root, dir))
				for _, e := range ents {
					if err := os.RemoveAll(filepath.Join(root, dir, e.Name())); err != nil {
						return err
					}
				}
			case strings.HasPrefix(base, whiteoutPrefix):
				if err := removeBelow(root, path.Join(path.Dir(rel), strings.TrimPrefix(base, whiteoutPrefix))); err != nil {
					return err
				}
			}
			continue
		}
		if strings.HasPrefix(base, whiteoutPrefix) {
			continue
		}
		if err := ensureParents(root, rel); err != nil {
			return err
		}
		p := filepath.Join(root, rel)
		mode := uint32(h.Mode & 0o7777)
		switch h.Typeflag {
		case tar.TypeDir:
			if st, err := os.Lstat(p); err == nil && !st.IsDir() {
				return fmt.Errorf("%s: not a directory in the image", h.Name)
			} else if err != nil {
				if err := os.Mkdir(p, 0o755); err != nil {
					return err
				}
			}
		case tar.TypeReg:
			os.Remove(p)
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			os.Remove(p)
			if err := os.Symlink(h.Linkname, p); err != nil {
				return err
			}
		case tar.TypeLink:
			target, err := safeRel(h.Linkname)
			if err != nil {
				return err
			}
			if err := ensureParents(root, target); err != nil {
				return err
			}
			if st, err := os.Lstat(filepath.Join(root, target)); err != nil || !st.Mode().IsRegular() {
				return fmt.Errorf("%s: hard link to %s, which is not a regular file in the image", h.Name, h.Linkname)
			}
			os.Remove(p)
			if err := os.Link(filepath.Join(root, target), p); err != nil {
				return err
			}
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			t := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[h.Typeflag]
			os.Remove(p)
			if err := unix.Mknod(p, t|mode, int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor)))); err != nil {
				return fmt.Errorf("%s: %w", h.Name, err)
			}
		default:
			continue // xattr-only and other headers carry no file
		}
		if err := os.Lchown(p, h.Uid, h.Gid); err != nil && os.Geteuid() == 0 {
			return err
		}
		if h.Typeflag != tar.TypeSymlink {
			if err := unix.Chmod(p, mode); err != nil {
				return err
			}
		}
	}
}

// safeRel turns a tar entry name into a clean path relative to the root,
// refusing names that leave it.
func safeRel(name string) (string, error) {
	if strings.Contains(name, "\x00") {
		return "", fmt.Errorf("entry name %q holds a NUL", name)
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", fmt.Errorf("entry %q leaves the image root", name)
		}
	}
	return strings.TrimPrefix(path.Clean("/"+name), "/"), nil
}

// ensureParents creates the parents of rel under root, refusing to go
// through a symlink or a non-directory.
func ensureParents(root, rel string) error {
	cur := root
	parts := strings.Split(rel, "/")
	for _, c := range parts[:len(parts)-1] {
		cur = filepath.Join(cur, c)
		st, err := os.Lstat(cur)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if err := os.Mkdir(cur, 0o755); err != nil {
				return err
			}
		case err != nil:
			return err
		case st.Mode()&os.ModeSymlink != 0:
			return fmt.Errorf("entry %q goes through the symlink %s", rel, strings.TrimPrefix(cur, root))
		case !st.IsDir():
			return fmt.Errorf("entry %q: %s is not a directory", rel, strings.TrimPrefix(cur, root))
		}
	}
	return nil
}
