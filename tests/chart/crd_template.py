"""The chart's CRD template, generated from the top-level ``crds/`` file.

``crds/`` is the single source: the operator's tests apply it and the chart
renders it. Helm cannot read files outside the chart, so the chart holds a
generated copy wrapped in the chart's switches (``crds.enabled``, ``crds.keep``)
and labels; ``tests/chart/test_crd.py`` fails when the copy drifts, and with
SIDEKEY_UPDATE_GOLDENS=1 rewrites it.
"""

from __future__ import annotations

from pathlib import Path

from sidekey.localcluster import helm

SOURCE = helm.ROOT / "crds" / "sidekey.io_agentpolicies.yaml"
TEMPLATE = helm.CHART / "templates" / "crd-agentpolicies.yaml"

HEADER = """\
{{- /*
Generated from crds/sidekey.io_agentpolicies.yaml by tests/chart/test_crd.py
(SIDEKEY_UPDATE_GOLDENS=1). Do not edit: change crds/ and regenerate.
*/}}
{{- if .Values.crds.enabled }}
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: agentpolicies.sidekey.io
  {{- if .Values.crds.keep }}
  annotations:
    # Deleting the CRD deletes every AgentPolicy, and with them every sidecar's access.
    helm.sh/resource-policy: keep
  {{- end }}
  labels:
    {{- include "sidekey.labels" (dict "ctx" . "component" "crd") | nindent 4 }}
"""
FOOTER = "{{- end }}\n"


def render(source: Path = SOURCE) -> str:
    """The template text for the CRD in ``source``: its ``spec:`` block, verbatim."""
    text = source.read_text()
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "spec:")
    body = "".join(lines[start:])
    # Helm would read "{{" in a CEL rule or description as a template action.
    body = body.replace("{{", '{{ "{{" }}')
    if not body.endswith("\n"):
        body += "\n"
    return HEADER + body + FOOTER
