// Package qemutest makes disk images with the real qemu-img for the tests
// of platforms that serve QCOW2 (a bucket of images, JD Cloud's exports):
// what those platforms hold is what qemu writes, not what we think it
// writes.
package qemutest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Available says whether qemu-img is installed.
func Available() bool {
	_, err := exec.LookPath("qemu-img")
	return err == nil
}

// QCOW2 writes raw, a disk's bytes, as a QCOW2 image in dir and returns its
// path.
func QCOW2(dir string, raw []byte) (string, error) {
	f, err := os.CreateTemp(dir, "disk-*.raw")
	if err != nil {
		return "", err
	}
	rawPath := f.Name()
	defer os.Remove(rawPath)
	_, err = f.Write(raw)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	img := strings.TrimSuffix(rawPath, ".raw") + ".qcow2"
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawPath, img).CombinedOutput(); err != nil {
		return "", fmt.Errorf("qemu-img convert: %w: %s", err, out)
	}
	return img, nil
}

// Raw converts a QCOW2 image to a raw file in dir, as qemu-img reads it:
// the reference a reader of the image is checked against.
func Raw(dir, img string) (string, error) {
	raw := filepath.Join(dir, filepath.Base(img)+".raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw).CombinedOutput(); err != nil {
		return "", fmt.Errorf("qemu-img convert: %w: %s", err, out)
	}
	return raw, nil
}
