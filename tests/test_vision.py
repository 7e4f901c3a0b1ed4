"""Vision-language models (issue 11): images through the engine to a Qwen2.5-VL, against transformers."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nbengine import Engine

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


SMALL, TALL = _image(48, 64, 0), _image(150, 100, 1)  # 4 and 15 image tokens
CASES = [("w10 w11 w12 w13 w14", None), (f"w20 w21 {IMG} w22 w23", SMALL),
         (f"w30 {IMG} w31 {IMG} w32 w33", [TALL, SMALL])]


def _hf_inputs(model_dir):
    """For each case: our expanded prompt ids, and transformers' input_ids tensor and image kwargs."""
    from nbengine.multimodal import load_processor
    from nbengine.tokenizer import Tokenizer

    proc, tok = load_processor(model_dir), Tokenizer(model_dir)
    for prompt, images in CASES:
        ids, mm = proc.process(tok.encode(prompt), [] if images is None else
                               images if isinstance(images, list) else [images], "p")
        x = torch.tensor([ids])
        kw = {} if mm is None else dict(pixel_values=mm.pixel_values, image_grid_thw=torch.tensor(mm.grids),
                                        mm_token_type_ids=(x == proc.image_token_id).int())
        yield ids, x, kw


def _hf_reference(model_dir) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs from transformers for each case (prompt expanded by our processor)."""
    import json

    import transformers

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids, x, kw in _hf_inputs(model_dir):
        with torch.no_grad():
            g = hf.generate(input_ids=x, **kw, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
        tokens = g.sequences[0, len(ids):].tolist()
        lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(g.logits, tokens)]
        out.append((tokens, lps))
    return out


@pytest.fixture(scope="module")
def reference(tiny_vlm):
    return _hf_reference(tiny_vlm)


def _check(outs, reference) -> None:
    for (tokens, lps), out in zip(reference, outs):
        assert out["output_ids"] == tokens
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert np.allclose(got, lps, atol=2e-4), (got, lps)


def _generate(llm, cases=CASES):
    return llm.generate([p for p, _ in cases], GREEDY, image_data=[im for _, im in cases], return_logprob=True)


def test_greedy_tokens_and_logprobs_match_transformers_with_0_1_2_images_in_one_batch(tiny_vlm, reference):
    with Engine(str(tiny_vlm), random_seed=0) as llm:
        _check(_generate(llm), reference)
        assert llm.get_server_info()["kv_pages_used"] == 0


def test_qwen2_vl_older_tower_matches_transformers_chunked_through_its_images(tiny_qwen2_vl):
    with Engine(str(tiny_qwen2_vl), random_seed=0, chunked_prefill_size=6, max_running_requests=2) as llm:
        _check(_generate(llm), _hf_reference(tiny_qwen2_vl))


def test_chunked_prefill_cutting_through_image_tokens_matches_and_encodes_each_request_once(tiny_vlm, reference):
    with Engine(str(tiny_vlm), random_seed=0, chunked_prefill_size=5, max_running_requests=2) as llm:
        model = llm._thread.core.runner.model
        calls = []
        encode = model.encode_images
        model.encode_images = lambda pixels, grids: calls.append(len(grids)) or encode(pixels, grids)
        _check(_generate(llm), reference)  # budget 5: every image run is split over several steps
    assert calls == [1, 2]  # once per request with images, not once per chunk


def test_preempted_requests_with_images_recompute_and_still_match(tiny_vlm, reference):
    cases = CASES * 3
    with Engine(str(tiny_vlm), random_seed=0, max_total_tokens=96, page_size=4) as llm:
        outs = _generate(llm, cases)
        assert llm.get_server_info()["num_preemptions"] > 0
        assert llm.get_server_info()["kv_pages_used"] == 0
    _check(outs, reference * 3)


def test_the_prefix_cache_keys_image_tokens_by_their_pixels(tiny_vlm):
    """Image tokens share one id whatever the image: the cache knows them by the image's pixel hash, so
    another image behind the same prompt is never reused and the same image is (without encoding it again)."""
    prompt = f"w40 w41 w42 w43 w44 w45 w46 w47 w40 w41 {IMG} w48 w49"
    first, second = SMALL, _image(48, 64, 7)  # the same number of image tokens, other pixels
    with Engine(str(tiny_vlm), random_seed=0, page_size=2) as llm:
        image_at, n_image = llm.processor.process(llm.tokenizer.encode(prompt), [first], "p")[1].spans[0]
        model = llm._thread.core.runner.model
        encoded = []
        encode = model.encode_images
        model.encode_images = lambda pixels, grids: encoded.append(len(grids)) or encode(pixels, grids)
        a = llm.generate(prompt, GREEDY, image_data=first)
        b = llm.generate(prompt, GREEDY, image_data=second)
        a_again = llm.generate(prompt, GREEDY, image_data=first)
    with Engine(str(tiny_vlm), random_seed=0, page_size=2, disable_radix_cache=True) as llm:
        want_a = llm.generate(prompt, GREEDY, image_data=first)
        want_b = llm.generate(prompt, GREEDY, image_data=second)
    assert 0 < b["meta_info"]["cached_tokens"] <= image_at  # the text before the image is reused, no more
    assert a_again["meta_info"]["cached_tokens"] >= image_at + n_image  # the image's pages too
    assert encoded == [1, 1]  # the third request found its image in the cache: not encoded again
    assert a["output_ids"] == a_again["output_ids"] == want_a["output_ids"]
    assert b["output_ids"] == want_b["output_ids"]


def test_chat_takes_openai_style_image_parts_like_generate_takes_image_data(tiny_vlm):
    buf = io.BytesIO()
    SMALL.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "w1 w2"}]
    with Engine(str(tiny_vlm), random_seed=0) as llm:
        got = llm.chat([[{"role": "user", "content": parts}], [{"role": "user", "content": "w1 w2"}]], GREEDY)
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, parts[1]]}])
        want = llm.generate(text, GREEDY, image_data=SMALL)
        plain = llm.generate(llm.tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}]), GREEDY)
        with pytest.raises(ValueError, match="not both"):
            llm.chat([{"role": "user", "content": parts}], GREEDY, image_data=SMALL)
    assert got[0]["output_ids"] == want["output_ids"] and got[1]["output_ids"] == plain["output_ids"]
    assert got[0]["meta_info"]["prompt_tokens"] == want["meta_info"]["prompt_tokens"]


def test_triton_runner_path_matches_transformers_in_the_interpreter(tiny_vlm, reference):
    """The CUDA runner's path (one metadata buffer, the fused M-RoPE rope+store kernel, Triton attention),
    here in Triton's interpreter on CPU; the same test runs compiled on a GPU."""
    with Engine(str(tiny_vlm), random_seed=0, attention_backend="triton", chunked_prefill_size=8,
                max_running_requests=2) as llm:
        _check(_generate(llm, CASES[1:]), reference[1:])


def test_every_image_form_gives_the_same_answer(tiny_vlm, tmp_path):
    buf = io.BytesIO()
    SMALL.save(buf, format="PNG")
    png = buf.getvalue()
    path = tmp_path / "small.png"
    path.write_bytes(png)
    forms = [SMALL, str(path), path, png, "data:image/png;base64," + base64.b64encode(png).decode()]
    prompt = f"w20 w21 {IMG} w22 w23"
    with Engine(str(tiny_vlm), random_seed=0) as llm:
        outs = [llm.generate(prompt, GREEDY, image_data=f)["output_ids"] for f in forms]
    assert all(o == outs[0] for o in outs)


@pytest.mark.parametrize("prompt, image_data, message", [
    (f"w1 {IMG}", [SMALL, SMALL], "1 image placeholder(s) but 2 image(s)"),
    ("w1 w2", SMALL, "0 image placeholder(s) but 1 image(s)"),
    (f"w1 {IMG}", None, "1 image placeholder(s) but 0 image(s)"),
    (f"w1 {IMG}", b"not an image", "could not be read as an image"),
    (f"w1 {IMG}", "/no/such/file.png", "no such file"),
    (f"w1 {IMG}", "data:image/png;base64,@@@", "not valid base64"),
    (f"w1 {IMG}", "https://example.com/a.png", "does not download images"),
    (f"w1 {IMG}", 42, "is a int"),
    ([f"w1 {IMG}", "w2"], [SMALL], "must be a list of 2 entries"),
])
def test_bad_image_inputs_raise_before_anything_is_enqueued(tiny_vlm, prompt, image_data, message):
    with Engine(str(tiny_vlm), random_seed=0) as llm:
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
            llm.generate(prompt, GREEDY, image_data=image_data)
        assert not llm._thread.core.seqs and llm.get_server_info()["kv_pages_used"] == 0
        assert len(llm.generate(f"w1 {IMG}", GREEDY, image_data=SMALL)["output_ids"]) == 6  # still works


def test_images_on_a_text_only_model_raise_a_clear_error(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as llm:
        with pytest.raises(ValueError, match="no vision encoder"):
            llm.generate("hello", GREEDY, image_data=SMALL)
        assert llm.generate("hello", GREEDY)["output_ids"]


def test_too_many_images_for_one_prompt_raise(tiny_vlm):
    with Engine(str(tiny_vlm), random_seed=0) as llm:
        with pytest.raises(ValueError, match="at most 16"):
            llm.generate("w1 " + IMG * 17, GREEDY, image_data=[SMALL] * 17)


# ------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_float32_greedy_matches_transformers(tiny_vlm, reference, backend):
    with Engine(str(tiny_vlm), random_seed=0, device="cuda", dtype="float32", attention_backend=backend,
                chunked_prefill_size=8, max_running_requests=2) as llm:
        _check(_generate(llm), reference)


@pytest.mark.gpu
@needs_cuda
def test_gpu_bfloat16_prompt_logprobs_match_transformers_within_bf16_rounding(tiny_vlm):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm, dtype=torch.float32).eval()
    with Engine(str(tiny_vlm), random_seed=0, device="cuda", dtype="bfloat16") as llm:
        outs = llm.generate([p for p, _ in CASES], {"temperature": 0, "max_new_tokens": 1},
                            image_data=[im for _, im in CASES], return_logprob=True, logprob_start_len=0)
    for (ids, x, kw), out in zip(_hf_inputs(tiny_vlm), outs):
        with torch.no_grad():
            lp = torch.log_softmax(hf(input_ids=x, **kw).logits[0].float(), -1)
        want = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        got = [v for v, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
        assert np.allclose(got, want, atol=0.08), max(abs(a - b) for a, b in zip(got, want))

