"""The notebook layer on an in-process IPython shell: magics, live display, Stop, interrupt, progress."""

from __future__ import annotations

import subprocess
import sys

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from nbengine.notebook import render
from nbengine.notebook.live import FLUSH_INTERVAL
from nbengine.notebook.views import NotebookView


@pytest.fixture(scope="module")
def ip(default_model_dir, tiny_llama):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbengine")
    magics = shell.magics_manager.registry["NBEngineMagics"]
    magics.registry.load(str(tiny_llama), "tiny")
    yield shell
    shell.run_line_magic("unload_ext", "nbengine")
    InteractiveShell.clear_instance()


def _panes(cap) -> dict[str, list]:
    """display_id -> its messages (first display, then updates), in order."""
    by_id: dict[str, list] = {}
    for o in _outputs(cap):
        did = (o.transient or {}).get("display_id") if hasattr(o, "transient") else None
        if did is not None:
            by_id.setdefault(did, []).append(o)
    return by_id


def _outputs(cap) -> list:
    if not hasattr(cap, "_nb_outputs"):  # _outputs(cap) builds new objects on each access
        cap._nb_outputs = cap.outputs
    return cap._nb_outputs


def _final_panes(cap) -> list:
    return [msgs[-1] for msgs in _panes(cap).values() if "nbengine" in (msgs[-1].metadata or {})]


def test_importing_nbengine_registers_no_magics():
    code = ("from IPython.core.interactiveshell import InteractiveShell; ip = InteractiveShell.instance(); "
            "import nbengine, nbengine.notebook; assert 'generate' not in ip.magics_manager.magics['cell']; "
            "ip.run_line_magic('load_ext', 'nbengine'); assert 'generate' in ip.magics_manager.magics['cell']; "
            "assert 'chat' in ip.magics_manager.magics['cell'] and 'nbengine' in ip.magics_manager.magics['line']")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_engine_never_imports_the_notebook_layer():
    code = ("import sys, nbengine.engine, nbengine.engine_core; "
            "assert not [m for m in sys.modules if m.startswith('nbengine.notebook')], sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_help_lists_the_options(ip):
    doc = ip.magics_manager.magics["cell"]["generate"].__doc__
    for opt in ("--model", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--stop", "--seed", "-n",
                "--system", "--chat", "--raw", "--format", "--out", "--no-stream", "--no-interpolate"):
        assert opt in doc, opt


def test_generate_streams_throttled_plain_text_then_markdown_with_metadata(ip):
    with capture_output() as cap:
        ip.run_cell_magic("generate", "--max-new-tokens 24 --temperature 0 -o res",
                          "\n\nWhat is the capital of France?\n\n")
    res = ip.user_ns["res"]
    (final,) = _final_panes(cap)
    pane = next(msgs for msgs in _panes(cap).values() if msgs[-1] is final)
    streaming = pane[:-1]
    assert all(set(m.data) == {"text/plain"} for m in streaming)  # plain text while streaming
    assert all(m.update for m in pane[1:])
    texts = [m.data["text/plain"] for m in streaming]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # the text only grows
    # throttled: at most one refresh per FLUSH_INTERVAL (+ the first display and the final flush)
    elapsed = final.metadata["nbengine"]["elapsed_s"]
    assert len(streaming) <= elapsed / FLUSH_INTERVAL + 3, (len(streaming), elapsed)
    assert final.data["text/markdown"] == res["text"] and "Paris" in res["text"]
    md = final.metadata["nbengine"]
    assert md["model"] == "SmolLM2-135M-Instruct" and md["chat_template"] is True
    assert md["params"]["temperature"] == 0 and md["params"]["max_new_tokens"] == 24
    assert md["completion_tokens"] == res["meta_info"]["completion_tokens"] > 0
    assert md["prompt_tokens"] == res["meta_info"]["prompt_tokens"]
    assert md["ttft_s"] is not None and md["elapsed_s"] >= md["ttft_s"]
    assert md["finish_reason"] == res["meta_info"]["finish_reason"]


def test_blank_lines_around_the_prompt_do_not_change_the_answer(ip):
    with capture_output():
        ip.run_cell_magic("generate", "--max-new-tokens 12 --temperature 0 --raw -o a", "The sky is")
        ip.run_cell_magic("generate", "--max-new-tokens 12 --temperature 0 --raw -o b", "\n  \nThe sky is\n\n")
    assert ip.user_ns["a"]["text"] == ip.user_ns["b"]["text"]
    assert ip.user_ns["a"]["meta_info"]["prompt_tokens"] == ip.user_ns["b"]["meta_info"]["prompt_tokens"]


def test_interpolation_fills_names_and_history_but_leaves_code_braces(ip):
    from nbengine.notebook.prompting import interpolate

    ns = {"topic": "tides", "In": ["", "x = 1"], "Out": {1: 42}}
    src = "About {topic}: {In[1]} gave {Out[1]}; keep {'a': 1}, {missing}, {Out[7]} and {x y}"
    assert interpolate(src, ns) == "About tides: x = 1 gave 42; keep {'a': 1}, {missing}, {Out[7]} and {x y}"
    ip.user_ns["topic"] = "tides"
    with capture_output():
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 2 --temperature 0 -o r1", "Say {topic}")
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 2 --temperature 0 -o r2", "Say tides")
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 2 --temperature 0 --no-interpolate -o r3",
                          "Say {topic}")
    assert ip.user_ns["r1"]["meta_info"]["prompt_tokens"] == ip.user_ns["r2"]["meta_info"]["prompt_tokens"]
    assert ip.user_ns["r3"]["meta_info"]["prompt_tokens"] != ip.user_ns["r2"]["meta_info"]["prompt_tokens"]


def test_batch_shows_one_pane_per_sample_and_stores_the_list(ip):
    ip.user_ns["qs"] = ["Hello", "The sea"]
    with capture_output() as cap:
        ip.run_cell_magic("generate", "-m tiny --raw -n 2 --max-new-tokens 4 --temperature 0.8 --seed 3 -o outs",
                          "{qs}")
    outs = ip.user_ns["outs"]
    assert isinstance(outs, list) and len(outs) == 4
    finals = _final_panes(cap)
    assert len(finals) == 4
    assert [f.data["text/markdown"].split("\n")[0] for f in finals] == \
        ["**1.1: Hello**", "**1.2: Hello**", "**2.1: The sea**", "**2.2: The sea**"]
    for f, o in zip(finals, outs):
        assert f.data["text/markdown"].endswith(o["text"])
        assert f.metadata["nbengine"]["seed"] == 3
    stats = [o.data["text/plain"] for o in _outputs(cap) if "4/4 done" in o.data.get("text/plain", "")]
    assert stats, "the stats line counts finished samples"


def test_keyboard_interrupt_aborts_frees_the_pages_and_keeps_the_partial_text(ip, monkeypatch):
    from nbengine.notebook import stream

    llm = ip.magics_manager.registry["NBEngineMagics"].registry.engines["tiny"]
    calls = {"n": 0}
    original = NotebookView.refresh

    def refresh_then_interrupt(self, run, changed):
        original(self, run, changed)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what the kernel's interrupt raises in the cell's wait loop

    monkeypatch.setattr(NotebookView, "refresh", refresh_then_interrupt)
    with capture_output() as cap, pytest.raises(KeyboardInterrupt) as exc:
        stream(llm, "Once upon a time", max_new_tokens=600, ignore_eos=True, temperature=0, chat=False, ui="text")
    run = exc.value.nbengine_run
    (out,) = run.outputs()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 600
    assert run.stopped == "interrupt" and run.t_aborted is not None
    (final,) = _final_panes(cap)
    assert final.data["text/markdown"].startswith(out["text"]) and "stopped after" in final.data["text/markdown"]
    info = llm.get_server_info()
    assert info["kv_pages_used"] == 0 and info["num_running_reqs"] == 0
    monkeypatch.setattr(NotebookView, "refresh", original)
    again = stream(llm, "Once upon a time", max_new_tokens=3, temperature=0, chat=False, ui="text")
    assert again["meta_info"]["completion_tokens"] == 3  # the engine is ready


class RecordingComm:
    """A comm that records what the kernel would send (ipywidgets' own tests do the same)."""

    log: list = []

    def __init__(self, *args, **kwargs):
        from comm.base_comm import BaseComm

        class _Comm(BaseComm):
            def publish_msg(inner, msg_type, data=None, metadata=None, buffers=None, **keys):
                RecordingComm.log.append((inner.comm_id, msg_type, data))

        self.__class__ = type("Recording", (_Comm,), {})
        _Comm.__init__(self, *args, **kwargs)


@pytest.fixture
def recording_comm(monkeypatch):
    import comm

    RecordingComm.log = []
    monkeypatch.setattr(comm, "create_comm", lambda *a, **k: RecordingComm(*a, **k))
    return RecordingComm.log


def test_stop_button_aborts_while_streaming_and_widget_updates_are_throttled(ip, monkeypatch, recording_comm):
    from nbengine.notebook import api

    llm = ip.magics_manager.registry["NBEngineMagics"].registry.engines["tiny"]
    original = NotebookView.refresh
    views = []

    def refresh_and_click(self, run, changed):
        original(self, run, changed)
        views.append({"box": self._box.comm.comm_id, "button": self.button.comm.comm_id,
                      "stats": self._stats.comm.comm_id})
        if len(views) == 2:
            self.button.click()  # what the frontend's click runs (on a subshell thread in JupyterLab)

    monkeypatch.setattr(NotebookView, "refresh", refresh_and_click)
    with capture_output() as cap:
        run = api.execute(api.prepare_run(llm, ["Once upon a time"],
                                          {"max_new_tokens": 600, "ignore_eos": True, "temperature": 0},
                                          chat=False, ui="widget"))
    ids = views[0]
    (out,) = run.outputs()
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and run.stopped == "stop"
    assert out["meta_info"]["completion_tokens"] < 600 and run.stats()["stop_to_abort_s"] is not None
    assert llm.get_server_info()["kv_pages_used"] == 0
    label_updates = [d for cid, t, d in recording_comm
                     if cid == ids["stats"] and t == "comm_msg" and d.get("method") == "update"]
    assert 1 <= len(label_updates) <= run.num_refreshes + 1  # one stats update per (throttled) refresh
    closed = {cid for cid, t, _ in recording_comm if t == "comm_close"}
    assert set(ids.values()) <= closed  # no widget left behind
    controls = [o for o in _outputs(cap) if "stopped ·" in o.data.get("text/plain", "")]
    assert controls and controls[-1].update  # the widget bar became a static stats line


def test_generate_list_from_a_cell_shows_a_progress_bar_that_closes(ip, monkeypatch):
    from nbengine.notebook import progress

    events = []

    class Bar:
        def __init__(self, total):
            events.append(("open", total))

        def advance(self, n):
            events.append(("advance", n))

        def close(self):
            events.append(("close",))

    monkeypatch.setattr(progress, "_Bar", Bar)
    llm = ip.magics_manager.registry["NBEngineMagics"].registry.engines["tiny"]
    llm.generate(["a", "b", "c"], {"max_new_tokens": 2})
    assert events == [("open", 3), ("advance", 1), ("advance", 1), ("advance", 1), ("close",)]
    events.clear()
    llm.generate("a", {"max_new_tokens": 2})  # one prompt: no bar
    monkeypatch.setenv("NBENGINE_PROGRESS", "0")
    llm.generate(["a", "b"], {"max_new_tokens": 2})
    assert events == []


def test_chat_keeps_a_conversation_per_session(ip):
    with capture_output():
        ip.run_cell_magic("chat", "--max-new-tokens 8 --temperature 0 -o t1", "My name is Ada.")
        ip.run_cell_magic("chat", "--max-new-tokens 8 --temperature 0 -o t2", "What is my name?")
        ip.run_cell_magic("chat", "--session other --max-new-tokens 8 --temperature 0 -o o1", "What is my name?")
    t1, t2, o1 = (ip.user_ns[k]["meta_info"]["prompt_tokens"] for k in ("t1", "t2", "o1"))
    assert t2 > t1 + 8 and o1 < t2  # turn 2 carries turn 1; the other session does not
    with capture_output() as cap:
        ip.run_line_magic("chat", "history")
    assert "2 exchange(s)" in cap.stdout and "My name is Ada." in cap.stdout
    with capture_output() as cap:
        ip.run_line_magic("chat", "reset")
        ip.run_line_magic("chat", "history")
    assert "is empty" in cap.stdout


def test_nbengine_line_magic_loads_lists_uses_reports_and_shuts_down(ip, tiny_llama):
    with capture_output() as cap:
        ip.run_line_magic("nbengine", f"load {tiny_llama} max_total_tokens=2048 --name tiny2")
        ip.run_line_magic("nbengine", "list")
        ip.run_line_magic("nbengine", "status")
    assert "* tiny2" in cap.stdout and "KV cache" in cap.stdout and "2048 tokens" in cap.stdout
    with capture_output():
        ip.run_cell_magic("generate", "--raw --max-new-tokens 3 --temperature 0 -o r", "Hi")
    assert ip.user_ns["r"]["meta_info"]["completion_tokens"] == 3
    with capture_output() as cap:
        ip.run_line_magic("nbengine", "use default")
        ip.run_line_magic("nbengine", "shutdown tiny2")
        ip.run_line_magic("nbengine", "list")
    assert "tiny2" not in cap.stdout.split("Shut down: tiny2.")[-1]
    with pytest.raises(UsageError, match="No engine named 'nope'"):
        ip.run_line_magic("nbengine", "use nope")


def test_format_code_inserts_a_cell_and_other_formats_render(ip, monkeypatch):
    inserted = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False: inserted.append(text))
    with capture_output() as cap:
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 4 --temperature 0 --format code -o c", "def f():")
    assert inserted == [ip.user_ns["c"]["text"].strip()]
    assert "inserted in a new cell below" in _final_panes(cap)[0].data["text/markdown"]
    ok = {"text": '```json\n{"a": [1, 2]}\n```', "meta_info": {"finish_reason": {"type": "stop"}}}
    assert render.bundle(ok, "json")["application/json"] == {"a": [1, 2]}
    bad = {"text": "{nope", "meta_info": {"finish_reason": {"type": "length"}}}
    assert "not valid JSON" in render.bundle(bad, "json")["text/plain"]
    assert render.bundle(ok, "text") == {"text/plain": ok["text"]}


BAD_CELLS = [  # (options, cell, what the one-line error says)
    ("-m tiny --temperature -2", "Hi", "temperature"),
    ("-m tiny --raw --system 'Be brief.'", "Hi", "--system needs the chat template"),
    ("-m tiny -n 2 --format code", "Hi", "one prompt and -n 1"),
    ("-m tiny", "\n\n", "empty"),
    ("-m tiny -o 1x", "Hi", "-o needs a variable name"),
    ("-m ./no/such/model", "Hi", "not found"),
]


def test_bad_options_are_one_line_errors_and_the_engine_keeps_working(ip):
    for options, cell, message in BAD_CELLS:
        with pytest.raises(UsageError, match=message):
            ip.run_cell_magic("generate", options, cell)
    with capture_output():
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 2 -o ok", "Hi")
    assert ip.user_ns["ok"]["meta_info"]["completion_tokens"] == 2


def test_no_stream_shows_the_final_output_only(ip):
    with capture_output() as cap:
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 3 --no-stream -o r", "Hi")
    finals = [o for o in _outputs(cap) if "nbengine" in (o.metadata or {})]
    assert len(finals) == 1 and finals[0].data["text/markdown"] == ip.user_ns["r"]["text"]
    assert not any(getattr(o, "update", False) for o in _outputs(cap))


def test_terminal_view_prints_the_text_as_it_comes(ip, capsys):
    from nbengine.notebook import stream

    llm = ip.magics_manager.registry["NBEngineMagics"].registry.engines["tiny"]
    out = stream(llm, "Hello", max_new_tokens=5, temperature=0, chat=False, ui="terminal")
    printed = capsys.readouterr().out
    assert printed.startswith(out["text"]) and "5 tokens" in printed


def _fresh_patch_state(monkeypatch):
    from nbengine.notebook import asyncio_patch

    monkeypatch.setattr(asyncio_patch, "_state", {"done": False, "patched": False})
    monkeypatch.setattr(asyncio_patch, "in_kernel", lambda: True)
    return asyncio_patch


def test_nest_asyncio_opt_out_leaves_the_loop_alone(monkeypatch):
    import asyncio

    ap = _fresh_patch_state(monkeypatch)
    monkeypatch.setenv("NBENGINE_NEST_ASYNCIO", "0")

    async def inside_a_running_loop():
        return ap.apply_in_kernel()

    assert asyncio.run(inside_a_running_loop()) is False and not ap.is_patched()


def test_nest_asyncio_skips_uvloop_with_a_one_line_warning(monkeypatch):
    ap = _fresh_patch_state(monkeypatch)
    monkeypatch.delenv("NBENGINE_NEST_ASYNCIO", raising=False)
    fake_loop = type("Loop", (), {"__module__": "uvloop"})()
    monkeypatch.setattr(ap.asyncio, "get_running_loop", lambda: fake_loop)
    with pytest.warns(UserWarning, match="cannot be patched"):
        assert ap.apply_in_kernel() is False
    assert ap.apply_in_kernel() is False  # once: no second warning, no second try


def test_nest_asyncio_is_not_applied_outside_a_kernel():
    from nbengine.notebook import asyncio_patch

    assert asyncio_patch.in_kernel() is False and asyncio_patch.apply_in_kernel() is False
