"""``python -m bench.instructions``: instructions per request on the fast path, under callgrind.

CPU time on a shared machine spreads ±10-20 % between runs; an instruction
count does not. This runs ``bench.requestpath``'s objects (the real
protocols, llhttp, the token check, the decision, the key, the scrubber, the
audit line, the metrics; sockets replaced by collecting transports) under
``valgrind --tool=callgrind``, counting only inside the loop that feeds the
requests (``itertools.starmap``'s step, toggled on by callgrind), so the
start-up and the key generation are left out. The count repeats to about
0.1 %; compare two trees by running this in each (or with ``PYTHONPATH``
pointing at a copy of the package).

    python -m bench.instructions [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import itertools
import re
import shutil
import subprocess
import sys
import tempfile


async def _loop(requests: int) -> None:
    from bench import requestpath

    _proxy, conn, up_conn, agent, up, request = await requestpath._setup()
    answer = requestpath._ANSWER

    def step() -> None:
        conn.data_received(request)
        up.out.clear()
        up_conn.data_received(answer)
        if not agent.out or conn.busy:
            raise SystemExit("bench.instructions: a request did not take the fast path to its end")
        agent.out.clear()

    for _ in range(300):  # warm: caches, the pooled connection, the token
        step()
    gc.collect()
    gc.freeze()
    collections.deque(itertools.starmap(step, itertools.repeat((), requests)), maxlen=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        asyncio.run(_loop(args.requests))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind")
    with tempfile.NamedTemporaryFile(prefix="callgrind-", suffix=".out") as out:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}", "--collect-atstart=no",
             "--toggle-collect=starmap_next", sys.executable, "-m", "bench.instructions", "--inner",
             "--requests", str(args.requests)],
            capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"bench.instructions: callgrind failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(f"fast path {int(found.group(1)) / args.requests:,.0f} instructions/request ({args.requests} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
