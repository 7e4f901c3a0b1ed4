"""The live engine dashboard and the request stats it reads."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from nbengine import Engine
from nbengine.notebook.dashboard import Dashboard, render_html, render_text, snapshot
from nbengine.request_stats import RequestStats


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as engine:
        yield engine


def test_request_stats_count_tokens_per_second_and_keep_recent_requests(monkeypatch):
    clock = [1000.2]
    monkeypatch.setattr("nbengine.request_stats.time.perf_counter", lambda: clock[0])
    stats = RequestStats(max_recent=2, window_s=5)
    stats.add_tokens(3)
    stats.add_tokens(2)
    clock[0] = 1002.5
    stats.add_tokens(4)
    clock[0] = 1003.1
    assert stats.tokens_per_second(5) == [0, 0, 5, 0, 4]  # seconds 998..1002, the current one (1003) left out
    assert stats.generated_tokens_total == 9
    for k in range(3):
        seq = SimpleNamespace(rid=f"r{k}", finish_reason={"type": "length"}, prompt_ids=[1, 2], output_ids=[5] * 4,
                              arrival=1000.0, first_token_at=1000.5)
        stats.finished(seq)
    recent = stats.recent_requests()
    assert [r["rid"] for r in recent] == ["r1", "r2"]  # the oldest dropped
    assert recent[0]["ttft_s"] == pytest.approx(0.5) and recent[0]["tok_per_s"] == pytest.approx(3 / 2.6)


def test_dashboard_numbers_match_get_server_info(llm):
    outs = llm.generate(["one", "two", "three"], {"max_new_tokens": 5, "temperature": 0})
    snap = snapshot(llm)
    info = llm.get_server_info()
    for key in ("num_running_reqs", "num_waiting_reqs", "num_finished_reqs", "kv_pages_used", "kv_pages_total",
                "kv_token_usage"):
        assert snap[key] == info[key], key
    # the prefix-cache numbers are the engine's where it reports them, else shown as "—"
    assert snap["cache_hit_rate"] == info.get("cache_hit_rate")
    assert snap["cached_tokens_total"] == info.get("cached_tokens_total")
    html = render_html(snap, "tiny")
    if info.get("cache_hit_rate") is None:
        assert 'data-key="prefix-cache hits"' in html and "—" in html and "prefix-cache hits —" in render_text(snap)
    recent = llm.get_recent_requests()
    assert {o["meta_info"]["id"] for o in outs} <= {r["rid"] for r in recent}
    assert all(r["completion_tokens"] == 5 and r["ttft_s"] > 0 for r in recent[-3:])
    assert sum(llm.get_throughput_history(60)) >= 15 or info["generated_tokens_total"] >= 15
    assert html.count("<tr>") == min(len(recent), 8) + 1  # a row per recent request (newest first) + the header
    with pytest.raises(ValueError, match="seconds must be an int"):
        llm.get_throughput_history(61)


def test_dashboard_refreshes_while_requests_run_and_stops_when_closed(llm):
    pytest.importorskip("ipywidgets")
    dash = Dashboard(llm, interval=0.05).show(widgets=True)
    try:
        start = dash._html.value
        done = threading.Event()
        threading.Thread(target=lambda: (llm.generate("go", {"max_new_tokens": 40, "temperature": 0}), done.set()),
                         daemon=True).start()
        deadline = time.monotonic() + 120  # generous: a shared 2-core machine
        while time.monotonic() < deadline and not (done.is_set() and dash.num_refreshes >= 2):
            time.sleep(0.05)
        assert done.is_set() and dash.num_refreshes >= 1 and dash._html.value != start
        rid = llm.get_recent_requests()[-1]["rid"][:8]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and rid not in dash._html.value:  # the refresh after it finished
            time.sleep(0.05)
        assert rid in dash._html.value and ">live<" in dash._html.value
    finally:
        dash.close()
    assert not dash.running and ">stopped<" in dash._html.value
    n = dash.num_refreshes
    llm.generate("more", {"max_new_tokens": 3})
    time.sleep(0.2)
    assert dash.num_refreshes == n  # closed: nothing more is sent
    assert len(dash._box.children) == 1  # the Close button is gone, the picture stays


def test_dashboard_stops_by_itself_when_its_engine_shuts_down(tiny_llama):
    pytest.importorskip("ipywidgets")
    engine = Engine(str(tiny_llama), random_seed=0)
    dash = Dashboard(engine, interval=0.05).show(widgets=True)
    engine.shutdown()
    dash._thread.join(timeout=30)
    assert not dash.running and ">stopped<" in dash._html.value
    with pytest.raises(ValueError, match="interval must be"):
        Dashboard(engine, interval=0)


def test_nbengine_dashboard_magic_shows_one_and_close_stops_it(llm):
    pytest.importorskip("ipywidgets")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    try:
        ip.run_line_magic("load_ext", "nbengine")
        ip.user_ns["tiny"] = llm
        magics = ip.magics_manager.registry["NBEngineMagics"]
        with capture_output() as cap:
            ip.run_line_magic("nbengine", "dashboard tiny")
        assert "application/vnd.jupyter.widget-view+json" in cap.outputs[0].data
        (dash,) = magics.dashboards
        assert dash.running and dash.llm is llm
        ip.run_line_magic("nbengine", "dashboard close")
        assert not dash.running and magics.dashboards == []
    finally:
        ip.run_line_magic("unload_ext", "nbengine")
        InteractiveShell.clear_instance()
