"""Images in cells (issue 11): ``%%generate --image`` / ``%%chat --image`` on a tiny random Qwen2.5-VL."""

from __future__ import annotations

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from PIL import Image

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
OPTS = "--temperature 0 --max-new-tokens 5 --no-stream"


@pytest.fixture(scope="module")
def ip(tiny_vlm, tiny_llama):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbengine")
    magics = shell.magics_manager.registry["NBEngineMagics"]
    magics.registry.load(str(tiny_llama), "text")
    magics.registry.load(str(tiny_vlm), "vlm")
    shell.user_ns["photo"] = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    yield shell
    shell.run_line_magic("unload_ext", "nbengine")
    InteractiveShell.clear_instance()


def _engine(ip, name):
    return ip.magics_manager.registry["NBEngineMagics"].registry.get(name, ip.user_ns)[1]


def test_generate_with_an_image_shows_its_thumbnail_first_and_answers_as_the_engine_does(ip, tmp_path):
    path = tmp_path / "photo.png"
    ip.user_ns["photo"].save(path)
    for source in ("photo", str(path)):
        with capture_output() as cap:
            ip.run_cell_magic("generate", f"-m vlm --raw --image {source} {OPTS} -o out", "w20 w21")
        html = [o.data.get("text/html", "") for o in cap.outputs]
        assert html and 'class="nbengine-images"' in html[0] and "data:image/png;base64," in html[0]
        want = _engine(ip, "vlm").generate(IMG + "w20 w21", {"temperature": 0, "max_new_tokens": 5},
                                           image_data=ip.user_ns["photo"])
        assert ip.user_ns["out"]["output_ids"] == want["output_ids"]


def test_streamed_generate_and_chat_send_the_image_with_the_chat_template(ip):
    with capture_output():
        ip.run_cell_magic("generate", "-m vlm --image photo --temperature 0 --max-new-tokens 4 -o out", "w20")
    assert ip.user_ns["out"]["meta_info"]["completion_tokens"] == 4
    with capture_output():
        ip.run_cell_magic("chat", "-m vlm --session pic --image photo --temperature 0 --max-new-tokens 3 -o a",
                          "w30")
        ip.run_cell_magic("chat", "-m vlm --session pic --temperature 0 --max-new-tokens 3 -o b", "w31")
    session = ip.magics_manager.registry["NBEngineMagics"].chats["pic"]
    assert len(session.images) == 1 and session.turns[0]["content"][0] == {"type": "image"}
    # the second turn still holds the first turn's image: one placeholder in its prompt, one image sent
    assert ip.user_ns["b"]["meta_info"]["prompt_tokens"] > ip.user_ns["a"]["meta_info"]["prompt_tokens"]


def test_image_on_a_text_only_model_or_a_missing_image_is_a_one_line_usage_error(ip):
    with pytest.raises(UsageError, match="vision-language model"):
        ip.run_cell_magic("generate", f"-m text --image photo {OPTS}", "hello")
    with pytest.raises(UsageError, match="no notebook variable or file"):
        ip.run_cell_magic("generate", f"-m vlm --image nothing_here {OPTS}", "w1")
