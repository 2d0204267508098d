"""A real, local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager.

Used by the tests and by ``sidekey demo``, so that both exercise sidekey against
the same apiserver a cluster runs (RBAC, the ServiceAccount admission plugin,
ValidatingAdmissionPolicy, TokenRequest) rather than a mock. There is no
scheduler or kubelet: pods stay Pending, and callers play the kubelet's part.
"""
