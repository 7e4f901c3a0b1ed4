"""Seeing inside the model: the token probability view, its escaping, branches (forks) and compare."""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from nbengine import Engine
from nbengine.notebook import Branches, compare, show_tokens
from nbengine.notebook.token_text import TokenDecoder
from nbengine.notebook.token_view import TokenRow, html_view, text_table

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as engine:
        yield engine


class _Spans(HTMLParser):
    """Every ``span.nbe-tok``: its attributes and its text, split by the enclosing div's class."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict] = []
        self._where: list[str] = []
        self._open: list[dict | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self._where.append(a.get("class", ""))
        if tag == "span":
            span = None
            if "nbe-tok" in (a.get("class") or "").split():
                span = {**a, "text": "", "in": self._where[-1] if self._where else ""}
                self.spans.append(span)
            self._open.append(span)
        if tag == "script":
            raise AssertionError("a <script> element made it into the view")

    def handle_endtag(self, tag):
        if tag == "div" and self._where:
            self._where.pop()
        if tag == "span" and self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._open and any(s is not None for s in self._open):
            next(s for s in reversed(self._open) if s is not None)["text"] += data


def _spans(html: str, where: str = "nbe-output") -> list[dict]:
    p = _Spans()
    p.feed(html)
    return [s for s in p.spans if where in s["in"]]


def test_probability_view_has_one_span_per_token_with_the_outputs_probabilities(llm):
    out = llm.generate("The quick brown fox", GREEDY, return_logprob=True, top_logprobs_num=5)
    view = show_tokens(out, llm, display=False)
    bundle = view._repr_mimebundle_()
    spans = _spans(bundle["text/html"])
    lps = out["meta_info"]["output_token_logprobs"]
    assert len(spans) == len(lps) == len(out["output_ids"])
    for i, (span, (lp, tid, _)) in enumerate(zip(spans, lps)):
        assert int(span["data-i"]) == i and int(span["data-id"]) == tid
        assert float(span["data-p"]) == pytest.approx(math.exp(lp), abs=1e-6)
        assert float(span["data-lp"]) == pytest.approx(lp, abs=1e-6)
        top = out["meta_info"]["output_top_logprobs"][i]
        for v, _, _ in top:  # the hover lists every alternative with its probability
            assert f"{math.exp(v):.4f}" in span["title"]
    assert "".join(s["text"] for s in spans).replace("↵", "") == llm.tokenizer.decode(out["output_ids"])
    assert "perplexity" in bundle["text/plain"] and f"{math.exp(lps[0][0]):.4f}" in bundle["text/plain"]


def test_prompt_view_shades_the_prompt_by_surprise_with_its_perplexity(llm):
    out = llm.generate("The quick brown fox", GREEDY, return_logprob=True, top_logprobs_num=5, logprob_start_len=0)
    html = show_tokens(out, llm, display=False)._repr_mimebundle_()["text/html"]
    prompt = _spans(html, "nbe-prompt")
    lps = out["meta_info"]["input_token_logprobs"]
    assert len(prompt) == out["meta_info"]["prompt_tokens"] == len(lps)
    assert "data-p" not in prompt[0] and "first token" in prompt[0]["title"]
    for span, (lp, tid, _) in zip(prompt[1:], lps[1:]):
        assert int(span["data-id"]) == tid and float(span["data-lp"]) == pytest.approx(lp, abs=1e-6)
        assert "surprise" in span["title"]
    ppl = math.exp(-sum(lp for lp, _, _ in lps[1:]) / (len(lps) - 1))
    assert f"perplexity {ppl:.2f}" in html


def test_show_tokens_without_logprobs_says_what_to_pass(llm):
    out = llm.generate("Hi", GREEDY)
    with pytest.raises(ValueError, match="return_logprob=True"):
        show_tokens(out, llm, display=False)
    with pytest.raises(TypeError, match="one output dict"):
        show_tokens([out], llm, display=False)


class _HostileTokenizer:
    """Token texts that would break naive HTML: markup, quotes, entities, newlines, half characters."""

    TEXT = {0: "<script>alert(1)</script>", 1: '" onmouseover="x()', 2: "&amp; <b>", 3: " \n\t ", 4: "\ufffd",
            5: "<|im_end|>"}
    VOCAB = {4: "æĿ"}  # GPT-2 byte-level stand-ins for the UTF-8 bytes E6 9D (the first two of 最)

    def decode(self, ids, skip_special_tokens=False):
        t = self.TEXT[ids[0]]
        return "" if skip_special_tokens and ids[0] == 5 else t

    def id_to_token(self, i):
        return self.VOCAB.get(i, self.TEXT[i])


def test_hostile_token_text_is_escaped_and_half_characters_show_as_bytes():
    decode = TokenDecoder(_HostileTokenizer())
    rows = [TokenRow(i, decode(i), -0.5, [(-1.0, decode((i + 1) % 6))]) for i in range(6)]
    html = html_view(rows)
    spans = _spans(html)  # raises on a <script> element
    assert len(spans) == 6
    assert spans[0]["text"] == "<script>alert(1)</script>"
    assert spans[1]["text"] == '" onmouseover="x()' and "onmouseover" not in spans[1]  # no attribute injected
    assert spans[2]["text"] == "&amp; <b>"
    assert spans[3]["text"] == " ↵\n\t "  # whitespace kept, the newline marked
    assert spans[4]["text"] == "<0xE6><0x9D>" and decode(4).has_bytes
    assert decode(5).special
    assert "<script>" in text_table(rows) and "'<0xE6><0x9D>'" in text_table(rows)


def test_fork_continuation_equals_a_fresh_generation_of_the_same_prefix(llm):
    br = Branches(llm, "Once upon a time", chat=False, temperature=0, max_new_tokens=10)
    root = br.branch
    alt = next(t for _, t in root.rows[3].top if t.token_id != root.rows[3].token.token_id)
    b = br.fork(3, alt.token_id)
    assert b.parent == 0 and br.current == b.index == 1
    assert b.token_ids[:3] == root.token_ids[:3] and b.token_ids[3] == alt.token_id and b.rows[3].forced
    fresh = llm.generate(input_ids=br.prompt_ids + root.token_ids[:3] + [alt.token_id],
                         sampling_params={"temperature": 0, "max_new_tokens": 6})
    assert b.token_ids[4:] == fresh["output_ids"]
    assert [r.position for r in b.rows] == list(range(len(b.rows)))
    assert br.texts() == [llm.tokenizer.decode(root.token_ids), llm.tokenizer.decode(b.token_ids)]
    # a fork of the fork, then walking back
    c = br.fork(0, root.rows[0].top[-1][1].token_id)
    assert c.parent == 1 and br.back().index == 1 and br.back().index == 0
    assert br.select(2).index == 2 and "2: from 1 at 0" in br.tree_text()
    with pytest.raises(ValueError, match="position must be"):
        br.fork(99, 1)
    with pytest.raises(ValueError, match="not one token"):
        br.fork(0, "two words here")


def test_branch_widget_click_on_an_alternative_forks_and_a_branch_click_selects(llm):
    br = Branches(llm, "Once upon a time", chat=False, temperature=0, max_new_tokens=6)
    w = br.widget()
    assert len(_spans(w.html)) == 6 and len(w.alternatives) == 6
    token_id = w.alternatives[2][0][0]
    w._on_msg(w, {"event": "fork", "position": 2, "token": token_id}, None)  # what the browser sends
    assert len(br.branches) == 2 and br.branch.token_ids[2] == token_id and w.busy == ""
    assert 'data-branch="1"' in w.html and 'data-forced="1"' in w.html
    w._on_msg(w, {"event": "select", "branch": 0}, None)
    assert br.current == 0
    w._on_msg(w, {"event": "fork", "position": 50, "token": token_id}, None)
    assert w.busy.startswith("could not fork: position must be") and len(br.branches) == 2


def test_compare_returns_what_separate_calls_return(llm, tiny_models):
    settings = [{"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 8}]
    with Engine(str(tiny_models["qwen2"]), random_seed=0) as other:
        with capture_output():
            outs = compare("A story:", settings, models=[llm, other], chat=False, max_new_tokens=8, ui="text")
        assert len(outs) == 6
        for k, engine in enumerate([llm, other]):
            for j, p in enumerate(settings):
                alone = engine.generate("A story:", {**p, "max_new_tokens": 8})
                assert outs[3 * k + j]["output_ids"] == alone["output_ids"]
                assert outs[3 * k + j]["text"] == alone["text"]


def test_compare_refuses_what_it_cannot_show(llm):
    with pytest.raises(ValueError, match="leave n at 1"):
        compare("x", [{"n": 2}], models=[llm])
    with pytest.raises(ValueError, match="at most 16 panes"):
        compare("x", [{"seed": i} for i in range(17)], models=[llm])
    with pytest.raises(TypeError, match="one non-empty prompt"):
        compare(["a", "b"], models=[llm])


@pytest.fixture
def ip(llm):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbengine")
    shell.user_ns["tiny"] = llm
    yield shell
    shell.run_line_magic("unload_ext", "nbengine")
    InteractiveShell.clear_instance()


def test_generate_show_probs_colours_tokens_as_they_stream_then_keeps_static_html(ip, llm):
    with capture_output() as cap:
        ip.run_cell_magic("generate", "-m tiny --raw --max-new-tokens 24 --temperature 0 --show prompt -o res",
                          "The <b>quick</b> fox")
    res = ip.user_ns["res"]
    outs = cap.outputs
    htmls = [o.data["text/html"] for o in outs if "text/html" in o.data and "nbe-tokens" in o.data["text/html"]]
    counts = [len(_spans(h)) for h in htmls]
    assert counts == sorted(counts) and counts[-1] == 24  # tokens get their colour as they arrive
    final = [o for o in outs if "nbengine" in (o.metadata or {})][-1]
    assert "<details" in final.data["text/html"] and "perplexity" in final.data["text/plain"]
    assert len(_spans(final.data["text/html"], "nbe-prompt")) == res["meta_info"]["prompt_tokens"]
    assert [int(s["data-id"]) for s in _spans(final.data["text/html"])] == res["output_ids"]
    prompt_text = "".join(s["text"] for s in _spans(final.data["text/html"], "nbe-prompt"))
    assert "<b>quick</b> fox" in prompt_text and "<b>" not in final.data["text/html"]  # escaped, shown as written


def test_compare_magic_runs_every_listed_setting_side_by_side(ip):
    with capture_output() as cap:
        ip.run_cell_magic("compare", "-m tiny --raw --max-new-tokens 6 --temperature 0 1 --seed 3 -o outs", "Hello")
    outs = ip.user_ns["outs"]
    assert len(outs) == 2 and all(o["meta_info"]["completion_tokens"] == 6 for o in outs)
    final = [o for o in cap.outputs if "nbengine" in (o.metadata or {})][-1]
    assert final.data["text/html"].count('class="nbe-pane"') == 2
    assert [p["label"] for p in final.metadata["nbengine"]["panes"]] == ["temperature=0.0", "temperature=1.0"]
    with pytest.raises(UsageError, match="at most 16"):
        ip.run_cell_magic("compare", "-m tiny --temperature 0 1 --seed 1 2 3 4 5 6 7 8 9", "Hello")


def test_show_probs_refuses_a_format_it_would_ignore(ip):
    with pytest.raises(UsageError, match="--format applies to --show text only"):
        ip.run_cell_magic("generate", "-m tiny --show probs --format json", "Hello")
