package kubevirttest

import (
	"crypto/tls"

	"github.com/vmexportfs/vmexportfs/backend/internal/testpki"
)

// newCert makes a fresh CA named caName and a loopback certificate it signed;
// the CA's PEM goes into a status cert or kubeconfig, and a rotation replaces
// both.
func newCert(caName string) (tls.Certificate, []byte, error) {
	return newCertFor(caName, testpki.Loopback())
}

// newCertFor is newCert for the names of leaf.
func newCertFor(caName string, leaf testpki.Leaf) (tls.Certificate, []byte, error) {
	ca, err := testpki.NewCA(caName)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	cert, err := ca.Issue(leaf)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return cert, ca.PEM(), nil
}
