"""The result document, the table printed last, and the chart.

Ratios against nginx are the headline: absolute numbers change from machine
to machine, the ratio to a C proxy doing the same job on the same cores much
less. Each target of the benchmark issue is checked against the medians.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import nginx

#: (key, measure, target text, limit, arm, metric); lower is better for each (issue 15's goals)
TARGETS: tuple[tuple[str, str, str, float, str, str], ...] = (
    ("cpu", "CPU on the full path (saturation, 16 conns)", "<= 100 us/request", 100.0,
     "sidekey", "cpu_us_per_req_c16"),
    ("p99", "added p99 at 500 rps, worst repetition", "<= 1 ms", 1000.0, "sidekey", "added_p99_us_500"),
    ("sse_ttfb", "added SSE time to first event (p50)", "<= 1 ms", 1000.0, "sidekey", "added_sse_ttfb_us"),
    ("sse_cpu", "CPU per SSE event", "<= 35 us", 35.0, "sidekey", "sse_cpu_us_per_event"),
    ("rss", "RSS after load", "<= 35 MB", 35.0, "sidekey", "rss_loaded_mib"),
    ("private", "private memory after load (RssAnon)", "<= 20 MB", 20.0, "sidekey", "rss_anon_loaded_mib"),
    ("ready", "sidecar start to ready", "<= 0.5 s", 0.5, "sidekey", "ready_s"),
    ("nocache", "CPU per request with no token cache (every call a first call)", "<= 250 us", 250.0,
     "sidekey-nocache", "cpu_us_per_req_c16"),
)
#: Targets that must hold in every repetition: the worst one is reported, not the median.
WORST_OF_REPS = frozenset({"p99"})

ARMS = ("direct", "nginx", "llhttp-floor", "aiohttp-floor", "sidekey", "sidekey-nocache", "sidekey-llm",
        "litellm")
COMPARED = ARMS[2:]
#: The scaling rows: (metric pattern, title, the counts) for the arms that have them.
SCALING: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("cpu_us_per_req_c{}", "CPU us/request at {} conns", (1, 16, 64, 256)),
    ("rss_c{}_mib", "RSS MiB after {} conns", (1, 16, 64, 256)),
    ("sse_cpu_us_per_event_s{}", "CPU us/SSE event, {} streams", (1, 10, 100)),
    ("rss_s{}_mib", "RSS MiB after {} streams", (1, 10, 100)),
)
SCALED = ("nginx", "sidekey")


def _versus(m: dict[str, float], base: dict[str, float], name: str) -> dict[str, float]:
    """How an arm compares with a baseline arm: rps and efficiency (>1: better than it), RSS (>1: more)."""
    r: dict[str, float] = {}
    for c in (16, 64):
        if base.get(f"rps_c{c}") and m.get(f"rps_c{c}"):
            r[f"rps_c{c}_vs_{name}"] = m[f"rps_c{c}"] / base[f"rps_c{c}"]
        if base.get(f"cpu_us_per_req_c{c}") and m.get(f"cpu_us_per_req_c{c}"):
            # efficiency: requests per CPU second, relative to the baseline's
            r[f"efficiency_c{c}_vs_{name}"] = base[f"cpu_us_per_req_c{c}"] / m[f"cpu_us_per_req_c{c}"]
    if base.get("sse_cpu_us_per_event") and m.get("sse_cpu_us_per_event"):
        r[f"sse_efficiency_vs_{name}"] = base["sse_cpu_us_per_event"] / m["sse_cpu_us_per_event"]
    if base.get("rss_loaded_mib") and m.get("rss_loaded_mib"):
        r[f"rss_vs_{name}"] = m["rss_loaded_mib"] / base["rss_loaded_mib"]
    return r


def _webhook_p99(external: dict[str, Any]) -> float | None:
    value = ((external.get("webhook_bench") or {}).get("handler") or {}).get("p99_ms")
    return float(value) if isinstance(value, int | float) else None


def assemble(*, plan: dict[str, Any], machine: dict[str, Any], notes: list[str],
             labels: dict[str, str], samples: dict[str, dict[str, list[float]]],
             medians: dict[str, dict[str, float]], external: dict[str, Any], seconds: float,
             quick: bool) -> dict[str, Any]:
    ratios: dict[str, dict[str, float]] = {}
    for arm in COMPARED:
        if arm in medians:
            ratios[arm] = {**_versus(medians[arm], medians.get("nginx", {}), "nginx"),
                           **_versus(medians[arm], medians.get("litellm", {}), "litellm")}
    targets: list[dict[str, Any]] = []
    for key, measure, text, limit, arm, metric in TARGETS:
        value = medians.get(arm, {}).get(metric)
        if key in WORST_OF_REPS and samples.get(arm, {}).get(metric):
            value = max(samples[arm][metric])
        targets.append({"key": key, "measure": measure, "target": text, "metric": f"{arm}.{metric}",
                        "value": value, "met": value is not None and value <= limit})
    eff = ratios.get("sidekey", {}).get("efficiency_c16_vs_nginx")
    targets.insert(1, {"key": "efficiency", "measure": "CPU efficiency vs nginx (16 conns)",
                       "target": ">= 0.3x", "metric": "sidekey efficiency_c16_vs_nginx",
                       "value": eff, "met": eff is not None and eff >= 0.3})
    webhook = _webhook_p99(external)
    targets.append({"key": "webhook", "measure": "webhook handler p99 at 100 rps", "target": "<= 5 ms",
                    "metric": "webhook_bench p99_ms", "value": webhook,
                    "met": webhook is not None and webhook <= 5.0})
    return {
        "schema": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": machine,
        "plan": plan,
        "setup": {
            "upstream": f"nginx (1 worker) answering every chat-completion POST with a fixed {len(nginx.BODY)}-byte "
                        "chat.completion; SSE: an aiohttp server "
                        "streaming 100 chat.completion.chunk events, 1 ms apart",
            "transport": "plain HTTP on loopback to the upstream (policy url http://127.0.0.1:PORT, "
                         "insecure: true), so TLS costs do not hide the proxy's own cost",
            "pinning": "wrk, the upstreams and the SSE client on the first core; the proxy under test "
                       "alone on the second (taskset)",
            "load": "wrk -t1; fixed rate by a Lua delay() schedule (bench/wrk/paced.lua)",
            "cpu": "utime+stime of the proxy's processes from /proc/<pid>/stat over the run, "
                   "divided by requests (or SSE events) served",
            "added latency": "arm minus direct in the same repetition, then the median",
        },
        "notes": notes,
        "labels": labels,
        "samples": samples,
        "medians": medians,
        "ratios": ratios,
        "targets": targets,
        "external": external,
    }


def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


ROWS: tuple[tuple[str, str, int], ...] = (
    ("rps_c16", "saturation rps, 16 conns", 0),
    ("rps_c64", "saturation rps, 64 conns", 0),
    ("cpu_us_per_req_c16", "proxy CPU us/request (16 conns)", 1),
    ("cpu_us_per_req_c64", "proxy CPU us/request (64 conns)", 1),
    ("cpu_us_per_req_500", "proxy CPU us/request (500 rps)", 1),
    ("core_share_c16", "proxy core share at saturation (16 conns)", 2),
    ("p50_us_500", "p50 at 500 rps (us)", 0),
    ("p99_us_500", "p99 at 500 rps (us)", 0),
    ("added_p50_us_500", "added p50 at 500 rps (us)", 0),
    ("added_p99_us_500", "added p99 at 500 rps (us)", 0),
    ("p999_us_500", "p99.9 at 500 rps (us)", 0),
    ("added_p999_us_500", "added p99.9 at 500 rps (us)", 0),
    ("steal_pct_500", "steal on the proxy core at 500 rps (%)", 1),
    ("sse_ttfb_us", "SSE first event p50 (us)", 0),
    ("added_sse_ttfb_us", "added SSE first event p50 (us)", 0),
    ("sse_cpu_us_per_event", "proxy CPU us per SSE event", 1),
    ("rss_idle_mib", "RSS idle (MiB)", 1),
    ("rss_loaded_mib", "RSS after load (MiB)", 1),
    ("rss_anon_loaded_mib", "of which private (RssAnon, MiB)", 1),
    ("rss_c256_mib", "RSS after 256 conns (MiB)", 1),
    ("ready_s", "start to ready (s)", 2),
)


def table(result: dict[str, Any]) -> str:
    """Markdown: the arms side by side, the ratios to nginx, then the targets."""
    medians = result["medians"]
    load = result["machine"].get("load_average_before", [0.0])[0]
    arms_here = [arm for arm in ARMS if arm in medians]
    lines = [f"### sidekey benchmark ({result['when']}, {result['machine']['cores']} cores, load average "
             f"{load:.1f} at start, {result['plan']['reps']} repetitions, medians"
             f"{'; QUICK smoke run' if result['quick'] else ''})",
             "", "| metric | " + " | ".join(arms_here) + " |", "|---|" + "---:|" * len(arms_here)]
    for key, title, digits in ROWS:
        cells = [_fmt(medians.get(arm, {}).get(key), digits=digits) for arm in arms_here]
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    shown = [arm for arm in COMPARED if arm in medians]
    lines += ["", "| vs nginx | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
    names = {"rps_c16_vs_nginx": "rps, 16 conns", "rps_c64_vs_nginx": "rps, 64 conns",
             "efficiency_c16_vs_nginx": "CPU efficiency, 16 conns",
             "efficiency_c64_vs_nginx": "CPU efficiency, 64 conns",
             "sse_efficiency_vs_nginx": "CPU efficiency, SSE events", "rss_vs_nginx": "RSS after load"}
    for key, title in names.items():
        cells = [_fmt(result["ratios"].get(arm, {}).get(key), "x", 2) for arm in shown]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if "litellm" in medians:
        peers = [arm for arm in shown if arm != "litellm"]
        lines += ["", "| vs LiteLLM (x; >1 is better than LiteLLM, but RSS: >1 is more) | "
                  + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers)]
        for key, title in names.items():
            cells = [_fmt(result["ratios"].get(arm, {}).get(key.replace("nginx", "litellm")), "x", 2)
                     for arm in peers]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    scaled = [arm for arm in SCALED if arm in medians]
    lines += ["", "| scaling | " + " | ".join(scaled) + " |", "|---|" + "---:|" * len(scaled)]
    for pattern, title, counts in SCALING:
        for n in counts:
            cells = [_fmt(medians[arm].get(pattern.format(n)), digits=1) for arm in scaled]
            if any(c != "-" for c in cells):
                lines.append(f"| {title.format(n)} | " + " | ".join(cells) + " |")
    lines += ["", "| target | goal | measured | |", "|---|---|---:|---|"]
    for t in result["targets"]:
        v = t["value"]
        digits = 2 if t["key"] in ("ready", "efficiency", "webhook") else 1
        lines.append(f"| {t['measure']} | {t['target']} | {_fmt(v, digits=digits)} | "
                     f"{'met' if t['met'] else ('missed' if v is not None else 'not measured')} |")
    ext = result.get("external") or {}
    wb = ext.get("webhook_bench") or {}
    op = ext.get("operator_ready") or {}
    if wb or op:
        lines += ["", "| control plane | p50 / median | p99 / p95 |", "|---|---:|---:|"]
        for key, title in (("handler", "webhook handler at 100 rps (ms)"),
                           ("https_open_loop", "webhook over HTTPS at 100 rps, open loop (ms)")):
            if isinstance(wb.get(key), dict):
                lines.append(f"| {title} | {_fmt(wb[key].get('p50_ms'), digits=2)} | "
                             f"{_fmt(wb[key].get('p99_ms'), digits=2)} |")
        for key, title in (("create", "operator: apply to Ready, create (s)"),
                           ("update", "operator: apply to Ready, update (s)")):
            if isinstance(op.get(key), dict):
                lines.append(f"| {title} | {_fmt(op[key].get('median'), digits=2)} | "
                             f"{_fmt(op[key].get('p95'), digits=2)} |")
        for name, got in ext.items():
            if isinstance(got, dict) and "error" in got:
                lines.append(f"\nnote: {name} failed: {got['error'][:300]}")
    for note in result["notes"]:
        lines.append(f"\nnote: {note}")
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = result["medians"]
    colors = {"direct": "#9e9e9e", "nginx": "#2e7d32", "llhttp-floor": "#8d6e63", "aiohttp-floor": "#f9a825",
              "sidekey": "#1565c0", "sidekey-nocache": "#90caf9", "sidekey-llm": "#6a1b9a",
              "litellm": "#c62828"}
    panels = (
        ("saturation rps (16 / 64 conns)", ("rps_c16", "rps_c64"), ARMS),
        ("proxy CPU us per request", ("cpu_us_per_req_c16", "cpu_us_per_req_500"), ARMS[1:]),
        ("added latency at 500 rps (us)", ("added_p50_us_500", "added_p99_us_500"), ARMS[1:]),
        ("SSE: added first event (us) / CPU us per event",
         ("added_sse_ttfb_us", "sse_cpu_us_per_event"), ARMS[1:]),
        ("RSS MiB (idle / after load)", ("rss_idle_mib", "rss_loaded_mib"), ARMS[1:]),
    )
    fig, grid = plt.subplots(2, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 8.4))
    axes = grid[0]
    _scaling_panels(medians, colors, grid[1])
    ratio_keys = ("efficiency_c16_vs_nginx", "rps_c16_vs_nginx", "sse_efficiency_vs_nginx")
    ratio_arms = [arm for arm in COMPARED if arm in result["ratios"]]
    ax0 = axes[0]
    width0 = 0.8 / max(1, len(ratio_arms))
    for i, arm in enumerate(ratio_arms):
        values = [result["ratios"][arm].get(k, 0.0) for k in ratio_keys]
        xs = [j + (i - (len(ratio_arms) - 1) / 2) * width0 for j in range(len(ratio_keys))]
        bars = ax0.bar(xs, values, width0, label=arm, color=colors[arm])
        ax0.bar_label(bars, fmt="%.2f", fontsize=7)
    ax0.axhline(1.0, color=colors["nginx"], linewidth=1)
    ax0.set_xticks(range(len(ratio_keys)), ["CPU efficiency", "rps (16 conns)", "SSE efficiency"], fontsize=7)
    ax0.set_title("vs nginx (x; nginx = 1)", fontsize=9)
    ax0.legend(fontsize=7)
    axes = axes[1:]
    for ax, (title, metrics, wanted) in zip(axes, panels, strict=True):
        arms = [arm for arm in wanted if arm in medians]
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            values = [medians.get(arm, {}).get(m, 0.0) for m in metrics]
            xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, values, width, label=arm, color=colors[arm])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics], fontsize=7)
        if "litellm" in arms:  # two orders of magnitude above the rest: a log scale keeps them readable
            ax.set_yscale("log")
        ax.set_title(title + (" (log)" if "litellm" in arms else ""), fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sidekey benchmark {result['when']} ({result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores, medians of {result['plan']['reps']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling_panels(medians: dict[str, dict[str, float]], colors: dict[str, str], axes: Any) -> None:
    """The second row: each scaling metric against concurrency (log x), one line per arm."""
    for ax, (pattern, title, counts) in zip(axes, SCALING, strict=False):
        for arm in SCALED:
            points = [(n, medians.get(arm, {}).get(pattern.format(n))) for n in counts]
            xs = [n for n, v in points if v is not None]
            ys = [v for _, v in points if v is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=arm, color=colors[arm])
        ax.set_xscale("log")
        ax.set_xticks(list(counts), [str(n) for n in counts], fontsize=7)
        ax.set_title("scaling: " + title.format("n"), fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for ax in list(axes)[len(SCALING):]:
        ax.axis("off")


START_MARK = "<!-- bench:results:start -->"
END_MARK = "<!-- bench:results:end -->"


def update_docs(result: dict[str, Any], doc: Path) -> bool:
    """Replace the results block of docs/performance.md with this run's table."""
    text = doc.read_text()
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        return False
    block = (f"{START_MARK}\n\n{table(result)}\n\nReproduce with `bench/run`; every sample is in "
             f"`bench/results/latest.json`, the chart in `bench/results/latest.png`.\n\n")
    doc.write_text(text[:start] + block + text[end:])
    return True
