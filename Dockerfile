# syntax=docker/dockerfile:1
#
# One image for every part: `sidekey operator`, `sidekey webhook` and the
# injected `sidekey proxy` sidecar (the chart and the webhook pass the
# subcommand). Dependencies are installed only from requirements.lock, every
# file hash-checked (pip --require-hashes). The runtime stage is distroless: no
# shell, no package manager, a numeric non-root user, and nothing written to
# the root filesystem at run time, so the pods run with readOnlyRootFilesystem.
#
# Paths the chart relies on:
#   /opt/sidekey/bin/sidekey   the entrypoint, a launcher whose interpreter runs
#                              isolated (python -I: no PYTHON* variable and no PATH
#                              entry changes what runs); the webhook injects
#                              `command: [/opt/sidekey/bin/sidekey, proxy]`
#   /opt/sidekey/bin/python    the venv's interpreter, on PATH as `python` (the helm
#                              test pod uses it)
#   /etc/sidekey/tls, /etc/sidekey/settings   mounted by the chart (webhook)
#   /tmp                       an emptyDir in the chart (operator, webhook)
#   UID/GID 65532              the chart's runAsUser and contract.SIDECAR_UID
#
# Without Docker, `hack/image` builds an image with the same layout from Debian
# packages and this lock (localcluster/image.py; docs/install.md).
#
# Refresh the lock after changing dependencies in pyproject.toml:
#   pip-compile --generate-hashes --allow-unsafe --strip-extras --build-deps-for=wheel \
#     --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

# The builder uses Debian 12's own Python, the same 3.11 the distroless runtime
# has at the same path (/usr/bin/python3), so the virtualenv moves across as is.
FROM debian:12-slim AS build
# gcc and the headers build the request path's C extensions (setup.py, mypyc); only
# /opt/sidekey moves to the runtime stage.
RUN apt-get update \
 && apt-get install --no-install-recommends -y python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sidekey
COPY requirements.lock /src/requirements.lock
RUN /opt/sidekey/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      --requirement /src/requirements.lock
COPY pyproject.toml setup.py README.md /src/
COPY cli /src/cli
COPY core /src/core
COPY proxy /src/proxy
COPY webhook /src/webhook
COPY operator /src/operator
COPY client /src/client
COPY localcluster /src/localcluster
COPY demo /src/demo
# The project itself: no dependency resolution here (--no-deps), only the lock's, whose
# build tools (mypy and what it needs) then leave with pip. Only the interpreter's links
# stay in bin/ (pip's console scripts would run the same code without -I), and the
# launcher replaces pip's `sidekey` script.
RUN /opt/sidekey/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
 && /opt/sidekey/bin/pip uninstall --yes mypy mypy-extensions ast-serialize librt pathspec \
 && /opt/sidekey/bin/pip uninstall --yes pip setuptools wheel \
 && find /opt/sidekey/bin -mindepth 1 ! -name 'python*' -delete \
 && /opt/sidekey/bin/python -m compileall -q /opt/sidekey/lib
COPY --chmod=755 localcluster/images/sidekey /opt/sidekey/bin/sidekey

FROM gcr.io/distroless/python3-debian12:nonroot
COPY --from=build /opt/sidekey /opt/sidekey
ENV PATH=/opt/sidekey/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8443 8787 8788 8080 9090
ENTRYPOINT ["/opt/sidekey/bin/sidekey"]
CMD ["--help"]
