"""What tests share that is not a fixture: the components run as processes, and namespaces.

``conftest.py`` files hold fixtures only; a test module that needs a running
webhook, the operator or a fresh namespace imports it from here, so no test
package imports another's ``conftest``. Harness parts that the demo and the
benchmarks share too (the kubelet-player, the mock upstreams, ``helm``) live
in ``localcluster/``.
"""
