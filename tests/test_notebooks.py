"""The notebooks in notebooks/ run top to bottom with nbclient on the default model, and say the right things."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jupyter_helpers import ROOT, kernel_env

pytestmark = pytest.mark.slow


def _execute(name: str, tmp_path: Path, monkeypatch) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient

    src = ROOT / "notebooks" / f"{name}.ipynb"
    shutil.copy(src, tmp_path / src.name)
    nb = nbformat.read(tmp_path / src.name, as_version=4)
    for key, value in kernel_env().items():  # the kernel imports this checkout
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", (cell["source"], out.get("ename"), out.get("evalue"))
    return nb.cells


def _text(cell: dict) -> str:
    """Everything a cell showed, as text (streams, plain text and Markdown of displays and results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        data = out.get("data", {})
        for mime in ("text/markdown", "text/plain", "application/json"):
            if mime in data:
                parts.append(data[mime] if isinstance(data[mime], str) else json.dumps(data[mime]))
    return "\n".join(parts)


def _cell(cells: list[dict], start: str) -> dict:
    return next(c for c in cells if c["cell_type"] == "code" and c["source"].startswith(start))


def _final(cell: dict) -> dict:
    """The finished %%generate output (the one carrying nbengine metadata)."""
    return next(o for o in cell["outputs"] if "nbengine" in o.get("metadata", {}))


def test_quickstart_runs_the_four_modes_including_asyncio_run_cells(tmp_path, monkeypatch, default_model_dir):
    cells = _execute("quickstart", tmp_path, monkeypatch)
    sync = _text(_cell(cells, "outputs = llm.generate"))
    assert all(f"Prompt: {p}" in sync for p in ["Hello, my name is", "The capital of France is", "The future of AI is"])
    assert sync.count("Generated text:") == 3
    assert "Generated text:" in _text(_cell(cells, 'print(f"Prompt: {prompts[1]}")'))
    pasted = _text(_cell(cells, "async def main():\n    outputs"))  # asyncio.run(main()) in a cell
    assert pasted.count("Generated text:") == 3
    streamed = _text(_cell(cells, "async def main():\n    for prompt"))  # loop.run_until_complete(main())
    assert streamed.count("Generated text:") == 1 and len(streamed) > 30
    awaited = _text(_cell(cells, "stream = await"))
    assert "'type': 'length'" in awaited and "'length': 8" in awaited


def test_magics_notebook_streams_interpolates_chats_and_reports(tmp_path, monkeypatch, default_model_dir):
    cells = _execute("magics", tmp_path, monkeypatch)
    answer = _final(_cell(cells, "%%generate --max-new-tokens 24"))
    assert "Paris" in answer["data"]["text/markdown"]
    md = answer["metadata"]["nbengine"]
    assert md["model"] == "SmolLM2-135M-Instruct" and md["params"]["max_new_tokens"] == 24 and md["completion_tokens"] > 0
    assert "Tokyo" in _final(_cell(cells, "%%generate --max-new-tokens 12"))["data"]["text/markdown"]  # {country}
    braces = _final(_cell(cells, "%%generate --raw --max-new-tokens 12 --temperature 0 "))  # {'a': 1, ...} sent as written
    assert braces["metadata"]["nbengine"]["finish_reason"] is not None
    raw = _final(_cell(cells, "%%generate --raw --max-new-tokens 12 --temperature 0.7"))["metadata"]["nbengine"]
    assert raw["seed"] == 42 and raw["chat_template"] is False
    assert _final(_cell(cells, "%%generate --system"))["metadata"]["nbengine"]["system"].startswith("You are a pirate")
    assert "inserted in a new cell below" in _final(_cell(cells, "%%generate --format code"))["data"]["text/markdown"]
    history = _text(_cell(cells, "%chat history"))
    assert "2 exchange(s)" in history and "My name is Ada." in history
    assert "KV cache" in _text(_cell(cells, "%nbengine status"))


def test_widgets_notebook_streams_with_widgets_and_stops_from_code(tmp_path, monkeypatch, default_model_dir):
    cells = _execute("widgets", tmp_path, monkeypatch)
    story_cell = _cell(cells, "%%generate")
    story = _final(story_cell)
    assert story["data"]["text/markdown"].strip() and story["metadata"]["nbengine"]["completion_tokens"] > 0
    # the widget bar (Stop + stats) was shown, then replaced by a static stats line
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) or "tok/s" in _text({"outputs": [o]})
               for o in story_cell["outputs"])
    assert "tokens ·" in _text(story_cell)
    assert "tokens" in _text(_cell(cells, "import nbengine"))
    stopped = _text(_cell(cells, "import threading")).split()
    i = stopped.index("abort")
    assert 8 <= int(stopped[i + 1]) < 400 and stopped[-1] == "0"  # stopped early; KV pages freed


def test_batch_notebook_shows_progress_and_one_pane_per_sample(tmp_path, monkeypatch, default_model_dir):
    cells = _execute("batch", tmp_path, monkeypatch)
    assert _text(_cell(cells, "questions = ")).count(" -> ") == 4
    panes = [o for o in _cell(cells, "%%generate -m llm --max").get("outputs", []) if "nbengine" in o.get("metadata", {})]
    assert len(panes) == 4 and panes[0]["data"]["text/markdown"].startswith("**1: What is 2 + 2?**")
    assert "(4, [" in _text(_cell(cells, "len(answers)"))
    samples = [o for o in _cell(cells, "%%generate -m llm -n 3").get("outputs", []) if "nbengine" in o.get("metadata", {})]
    assert [o["metadata"]["nbengine"]["seed"] for o in samples] == [7, 7, 7] and len(samples) == 3


def test_vision_notebook_runs_on_a_tiny_vision_model(tmp_path, monkeypatch, tiny_vlm):
    monkeypatch.setenv("NBENGINE_VISION_MODEL", str(tiny_vlm))
    cells = _execute("vision", tmp_path, monkeypatch)
    first = _text(_cell(cells, "def ask("))
    assert "prompt tokens (image included):" in first
    batch = _text(_cell(cells, "small = img.resize")).splitlines()
    counts = [int(line.split()[0]) for line in batch if "prompt tokens ->" in line]
    assert len(counts) == 3 and counts[0] > counts[1] > counts[2]  # two images > one image > none
    for start in ("%%generate -m llm --image img", "%%chat -m llm --session shapes --image"):
        outs = _cell(cells, start)["outputs"]
        assert 'class="nbengine-images"' in outs[0]["data"]["text/html"]  # the thumbnails come first
        assert _final(_cell(cells, start))["metadata"]["nbengine"]["completion_tokens"] > 0
    assert _final(_cell(cells, "%%chat -m llm --session shapes --max"))["metadata"]["nbengine"]["completion_tokens"] > 0
    assert "'" in _text(_cell(cells, "import base64, httpx"))  # the server's answer, a string
def test_explore_notebook_shows_probabilities_compare_branches_and_the_dashboard(tmp_path, monkeypatch,
                                                                                  default_model_dir):
    cells = _execute("explore", tmp_path, monkeypatch)
    probs = _final(_cell(cells, "%%generate --show probs"))
    assert probs["data"]["text/html"].count('class="nbe-tok"') == probs["metadata"]["nbengine"]["completion_tokens"]
    assert "perplexity" in probs["data"]["text/plain"]
    prompt = _final(_cell(cells, "%%generate --show prompt"))["data"]["text/html"]
    assert 'class="nbe-prompt"' in prompt and "surprise" in prompt
    shown = next(o for o in _cell(cells, "llm = current_engine()")["outputs"] if "text/html" in o.get("data", {}))
    assert 'class="nbe-tok"' in shown["data"]["text/html"]
    grid = _final(_cell(cells, "%%compare"))
    assert grid["data"]["text/html"].count('class="nbe-pane"') == 4 and len(grid["metadata"]["nbengine"]["panes"]) == 4
    assert _text(_cell(cells, '[p["meta_info"]')).count(",") == 3  # four outputs returned
    forks = _text(_cell(cells, "br = Branches"))
    assert forks.startswith("0 ") and "\n1 " in forks
    assert "application/vnd.jupyter.widget-view+json" in _cell(cells, "br.show()")["outputs"][0]["data"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in _cell(cells, "%nbengine dashboard")["outputs"])
