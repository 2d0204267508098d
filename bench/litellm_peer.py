"""LiteLLM's proxy as the Python peer arm: its own venv, its config, and a start that stays on loopback.

LiteLLM is never a project dependency: the bench installs one pinned
version into a venv of its own (``~/.cache/sidekey/bench/litellm-venv-system``,
reused across runs) with pip from PyPI. The venv is made from Debian 12's own
``/usr/bin/python3.11``, the build the sidecar runs on in its image (bench/shipped.py),
so the two Python arms are compared on the same interpreter. The proxy serves two model names,
``bench`` (the JSON upstream) and ``bench-sse`` (the SSE upstream), both
``openai/gpt-4o-mini`` with ``api_base`` the bench's own upstream on
loopback and a fixed upstream key; the agent side authenticates with a
fixed master key, as the sidecar's agents present a token. The model is
one LiteLLM's bundled cost map prices, so its cost accounting runs as in a
real deployment: with an unpriced name (``openai/bench``) it ran a
zero-cost diagnostic on every request, 15 ms of CPU each (py-spy dump).

Nothing may leave loopback, not even DNS: LiteLLM fetches a model cost map
from GitHub at start unless told otherwise, so it runs with
``LITELLM_OFFLINE_MODE=true`` (every fetch of its own off, per its docs on
outbound requests) and ``LITELLM_LOCAL_MODEL_COST_MAP=true``, no telemetry
and no callbacks, and every HTTP proxy variable pointed at a closed
loopback port with loopback alone exempt, so an outside attempt fails at
once instead of resolving a name.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

VERSION = "1.106.12"
#: Debian 12's python3.11 (profile-guided and LTO, as the image's): the same build the sidecar runs on.
INTERPRETER = Path("/usr/bin/python3.11")
VENV = Path.home() / ".cache" / "sidekey" / "bench" / "litellm-venv-system"
MASTER_KEY = "sk-bench-litellm-master-0123456789"
_MARK = VENV / f".installed-{VERSION}"


class PeerError(RuntimeError):
    """The LiteLLM arm cannot run: the whole benchmark run fails with this."""


def ensure_installed(say: Callable[[str], None] = print) -> Path:
    """The venv's ``litellm`` script, installing the pinned version on first use."""
    script = VENV / "bin" / "litellm"
    if _MARK.exists() and script.exists():
        return script
    say(f"installing litellm[proxy]=={VERSION} into {VENV} (once; PyPI)")
    try:
        if not INTERPRETER.exists():
            raise PeerError(f"LiteLLM runs on {INTERPRETER}, the sidecar's interpreter, and this host has none: "
                            "apt-get install python3.11 python3.11-venv")
        if not (VENV / "bin" / "python").exists():
            subprocess.run([str(INTERPRETER), "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={VERSION}"],
                       check=True, timeout=1500)
    except (subprocess.SubprocessError, OSError) as exc:
        raise PeerError(f"could not install litellm[proxy]=={VERSION} into {VENV}: {exc}") from exc
    if not script.exists():
        raise PeerError(f"pip installed litellm but {script} is missing")
    _MARK.touch()
    return script


def config(workdir: Path, upstream_port: int, sse_port: int, key: str) -> Path:
    """One OpenAI-compatible model per upstream, a master key, nothing else switched on."""
    models = "".join(f"""  - model_name: {name}
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{port}/v1
      api_key: {key}
""" for name, port in (("bench", upstream_port), ("bench-sse", sse_port)))
    text = f"""model_list:
{models}litellm_settings:
  telemetry: false
  drop_params: true
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: {MASTER_KEY}
"""
    path = workdir / "litellm.yaml"
    path.write_text(text)
    return path


def environment(workdir: Path) -> dict[str, str]:
    closed = "http://127.0.0.1:9"  # discard port, nothing listens: any outside call fails at once
    return {
        "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
        "HOME": str(workdir),  # nothing of the user's (config, caches) is read
        "LITELLM_OFFLINE_MODE": "true",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
        "DISABLE_SCHEMA_UPDATE": "true",
        "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed,
        "http_proxy": closed, "https_proxy": closed, "all_proxy": closed,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


def command(script: Path, conf: Path, port: int) -> list[str]:
    return [str(script), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
