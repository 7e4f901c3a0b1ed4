"""Notebook-layer latency in a real kernel, seen from the client as a frontend sees it.

For a 200-token ``%%generate`` on the default model: display messages per second, delay from a
token being produced to the display refresh that shows it, time from the kernel interrupt to
the abort, and from a Stop click (sent on a kernel subshell, as JupyterLab >= 4.4 does) to the
abort. Prints a table and writes benchmarks/results/notebook_latency.json.

    PYTHONPATH=$PWD python3 benchmarks/notebook_latency.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

ROOT = Path(__file__).resolve().parents[1]
COUNTED = {"display_data", "update_display_data", "comm_msg", "comm_open", "comm_close", "stream",
           "execute_result", "clear_output"}
LONG = "%%generate --raw --max-new-tokens 1500 --temperature 0\n1, 2, 3, 4, 5,"
TRACE = """
import json, statistics
from nbengine.notebook import api
llm = get_ipython().magics_manager.registry['NBEngineMagics'].registry.engines['default']
run = api.execute(api.prepare_run(llm, ['1, 2, 3, 4, 5,'], {'max_new_tokens': 200, 'temperature': 0}, chat=False,
                                  trace=True))
refresh = run.trace['refreshes']
delays = []
for t, n in run.trace['chunks']:
    shown = next((tr for tr, nr in refresh if tr >= t and nr >= n), None)
    if shown is not None:
        delays.append(shown - t)
print(json.dumps({'delays_ms': [1000 * d for d in delays], 'refreshes': len(refresh),
                  'elapsed_s': run.stats()['elapsed_s'], 'tokens': run.tokens}))
"""


class Kernel:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env)

    def messages(self, msg_id: str, until_idle: bool = True, timeout: float = 600):
        """(arrival time, message) for ``msg_id`` until the kernel is idle again."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            yield time.perf_counter(), msg
            if until_idle and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return

    def run(self, code: str) -> str:
        out = []
        for _, m in self.messages(self.kc.execute(code)):
            if m["msg_type"] == "stream":
                out.append(m["content"]["text"])
            if m["msg_type"] == "error":
                raise RuntimeError(m["content"]["evalue"])
        return "".join(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def rate(k: Kernel) -> dict:
    msg_id = k.kc.execute("%%generate --raw --max-new-tokens 200 --temperature 0\n1, 2, 3, 4, 5,")
    times = [t for t, m in k.messages(msg_id) if m["msg_type"] in COUNTED]
    span = times[-1] - times[0]
    return {"messages": len(times), "span_s": span, "messages_per_s": len(times) / span}


def stop_once(k: Kernel, how: str, subshell: str | None) -> dict:
    msg_id = k.kc.execute(LONG)
    updates = 0
    button = None
    t_stop = t_seen = md = None
    for t, m in k.messages(msg_id):
        kind = m["msg_type"]
        if kind == "comm_open" and m["content"]["data"]["state"].get("_model_name") == "ButtonModel":
            button = m["content"]["comm_id"]
        if kind == "update_display_data":
            updates += 1
            meta = m["content"].get("metadata", {}).get("nbengine")
            if meta and t_stop is not None:
                t_seen, md = t, meta
        if updates == 20 and t_stop is None:
            t_stop = time.perf_counter()
            if how == "interrupt":
                k.km.interrupt_kernel()
            else:
                click = k.kc.session.msg("comm_msg", {"comm_id": button,
                                                      "data": {"method": "custom", "content": {"event": "click"}}})
                click["header"]["subshell_id"] = subshell
                k.kc.shell_channel.send(click)
    return {"client_ms": 1000 * (t_seen - t_stop), "kernel_ms": 1000 * md["stop_to_abort_s"],
            "tokens": md["completion_tokens"], "stopped": md.get("stopped")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    k = Kernel()
    try:
        k.run("%load_ext nbengine")
        k.run("%%generate --raw --max-new-tokens 8 --temperature 0\nwarm up")
        r = rate(k)
        trace = json.loads(k.run(TRACE).strip().splitlines()[-1])
        k.kc.control_channel.send(k.kc.session.msg("create_subshell_request", {}))
        subshell = k.kc.get_control_msg(timeout=10)["content"]["subshell_id"]
        interrupts = [stop_once(k, "interrupt", None) for _ in range(args.repeat)]
        stops = [stop_once(k, "stop", subshell) for _ in range(args.repeat)]
    finally:
        k.close()
    d = trace["delays_ms"]
    res = {
        "device": cpu_name(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "display": {**r, "tokens": 200},
        "token_to_display_ms": {"median": statistics.median(d), "p95": sorted(d)[int(0.95 * (len(d) - 1))],
                                "max": max(d), "chunks": len(d), "refreshes": trace["refreshes"],
                                "refreshes_per_s": trace["refreshes"] / trace["elapsed_s"]},
        "interrupt_to_abort": interrupts,
        "stop_click_to_abort": stops,
    }
    out = ROOT / "benchmarks" / "results" / "notebook_latency.json"
    out.write_text(json.dumps(res, indent=1))

    def med(rows, key):
        return statistics.median(x[key] for x in rows)

    print(f"device: {res['device']} ({res['cpus']} CPUs, load average {res['load_average'][0]:.1f}), {res['date']}")
    print(f"200-token %%generate: {r['messages']} display messages in {r['span_s']:.2f} s = "
          f"{r['messages_per_s']:.1f} messages/s")
    t = res["token_to_display_ms"]
    print(f"token produced -> display refresh: median {t['median']:.1f} ms, p95 {t['p95']:.1f} ms, max {t['max']:.1f} ms "
          f"({t['refreshes']} refreshes, {t['refreshes_per_s']:.1f}/s)")
    for name, rows in (("kernel interrupt -> abort", interrupts), ("Stop click -> abort", stops)):
        print(f"{name}: in the kernel median {med(rows, 'kernel_ms'):.1f} ms (max "
              f"{max(x['kernel_ms'] for x in rows):.1f}); client sees the stopped output after median "
              f"{med(rows, 'client_ms'):.1f} ms (max {max(x['client_ms'] for x in rows):.1f}); "
              f"stopped as {[x['stopped'] for x in rows][0]!r}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
