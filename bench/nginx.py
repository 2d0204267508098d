"""Our own nginx instances (never the system service): the upstream and the C baseline.

Both run with one worker, ``daemon off`` and every path in a temporary
directory. The upstream answers a fixed small JSON body. The proxy arm does
the same job as the sidecar in C: it attaches a static key with
``proxy_set_header Authorization``, keeps upstream connections alive,
streams (``proxy_buffering off``) and writes a buffered access log, as the
sidecar writes an audit line per request.
"""

from __future__ import annotations

import os
from pathlib import Path

#: A complete chat completion (created and usage included), so the LiteLLM arm can parse it as OpenAI's.
BODY = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench",'
        '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}')


def _common(workdir: Path, name: str) -> tuple[str, str]:
    """The main-context lines of one instance, and its temp directory."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = workdir / f"{name}-temp"
    temp.mkdir(parents=True, exist_ok=True)
    return f"""{user}worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
""", str(temp)


def _http_common(temp: str) -> str:
    return f"""
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
"""


def upstream_config(workdir: Path, port: int) -> Path:
    head, temp = _common(workdir, "upstream")
    text = head + f"""http {{
  access_log off;{_http_common(temp)}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      return 200 '{BODY}';
    }}
  }}
}}
"""
    path = workdir / "upstream.conf"
    path.write_text(text)
    return path


def proxy_config(workdir: Path, port: int, upstream_port: int, sse_port: int, key: str) -> Path:
    head, temp = _common(workdir, "proxy")
    proxied = f"""proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {key}";
      proxy_buffering off;"""
    text = head + f"""http {{
  log_format audit escape=json '{{"time":"$time_iso8601","request_id":"$request_id",'
    '"method":"$request_method","path":"$uri","status":$status,'
    '"bytes_in":$request_length,"bytes_out":$bytes_sent,"duration_s":$request_time}}';
  access_log {workdir}/proxy-access.log audit buffer=64k flush=1s;{_http_common(temp)}
  upstream api {{ server 127.0.0.1:{upstream_port}; keepalive 128; keepalive_requests 10000000; }}
  upstream sse {{ server 127.0.0.1:{sse_port}; keepalive 128; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port};
    location /bench/ {{
      proxy_pass http://api/;
      {proxied}
    }}
    location /sse/ {{
      proxy_pass http://sse/;
      {proxied}
    }}
  }}
}}
"""
    path = workdir / "proxy.conf"
    path.write_text(text)
    return path


def command(config: Path) -> list[str]:
    return ["nginx", "-c", str(config), "-p", str(config.parent), "-g", "daemon off;"]
