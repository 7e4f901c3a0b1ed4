"""A new user's first hour: the CLI's defaults serve the default model, and a model folder's
generation_config.json supplies default sampling values as in SGLang (sampling_defaults="model")."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from nbengine import cli
from nbengine.engine import Engine

FRANCE = "What is the capital of France?"
HAIKU = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    with Engine(str(default_model_dir)) as llm:
        yield llm


def _cli_request(llm, prompt: str, *flags: str) -> tuple[list[int], dict]:
    """What ``nbengine generate PROMPT FLAGS`` sends: the templated ids and the sampling params."""
    args = cli._parser().parse_args(["generate", prompt, *flags])
    ids = cli.prompt_ids(llm.tokenizer, args.prompt, args.raw, args.system)
    return ids, cli.sampling_params(args, llm.get_server_info()["default_sampling_params"])


def test_france_answers_paris_in_at_least_9_of_10_seeds_with_the_cli_defaults(default_llm):
    requests = [_cli_request(default_llm, FRANCE, "--seed", str(seed)) for seed in range(10)]
    outs = default_llm.generate(input_ids=[ids for ids, _ in requests], sampling_params=[p for _, p in requests])
    answers = [o["text"] for o in outs]
    assert sum("Paris" in a for a in answers) >= 9, answers


def test_the_haiku_ends_by_itself_without_a_loop(default_model_dir, capsys):
    # what scripts/quickstart.sh runs, end to end through the CLI
    assert cli.main(["generate", HAIKU, "--model", str(default_model_dir), "--stats"]) == 0
    captured = capsys.readouterr()
    stats = re.search(r"\+ (\d+) new tokens .* finish: \{'type': 'stop', 'matched': (\d+)\}", captured.err)
    assert stats, captured.err  # ended by a stop token (EOS), not by the length limit
    assert int(stats.group(1)) < cli.CLI_SAMPLING_DEFAULTS["max_new_tokens"] // 2
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert lines and len(lines) == len(set(lines)), captured.out  # no line repeated


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--max-new-tokens", "256"), ("--temperature", "else 0"), ("--top-p", "else 1.0"),
                          ("--top-k", "else -1"), ("--min-p", "else 0.0"), ("--repetition-penalty", "else 1.0"),
                          ("--seed", "random"), ("--dtype", "auto"), ("--device", "auto"), ("--model", "SmolLM2")]:
        assert flag in text
        start = text.rindex(flag)  # in the options list, after the usage line
        assert default in text[start: start + 260], (flag, default)


def test_flags_win_over_the_cli_defaults():
    args = cli._parser().parse_args(["generate", "x", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"])
    params = cli.sampling_params(args, {"temperature": 0.2, "top_k": 40})
    assert params["temperature"] == 0.7 and params["top_p"] == 0.9 and params["top_k"] == 40
    assert params["seed"] == 3 and params["max_new_tokens"] == 256


# --------------------------------------------------------------------- sampling_defaults
@pytest.fixture(scope="module")
def model_with_generation_config(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen-config") / "model"
    shutil.copytree(tiny_llama, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(temperature=0.0, top_k=0, repetition_penalty=1.3, do_sample=True, max_new_tokens=3)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def test_sampling_defaults_model_reads_generation_config(model_with_generation_config, tiny_llama):
    explicit = {"temperature": 0.0, "repetition_penalty": 1.3, "max_new_tokens": 12, "ignore_eos": True}
    with Engine(str(model_with_generation_config), random_seed=0) as llm:
        info = llm.get_server_info()
        assert info["sampling_defaults"] == "model"
        # HF's top_k=0 means "off" (-1 here); max_new_tokens and do_sample are not sampling defaults in SGLang
        assert info["default_sampling_params"] == {"temperature": 0.0, "top_k": -1, "repetition_penalty": 1.3}
        got = llm.generate("Hello there", {"max_new_tokens": 12, "ignore_eos": True})
        want = llm.generate("Hello there", explicit)
        assert got["output_ids"] == want["output_ids"]
        # a request's own value wins over the model's
        hot = llm.generate(["Hello there"] * 4, {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True})
        assert len({tuple(o["output_ids"]) for o in hot}) > 1
    with Engine(str(model_with_generation_config), random_seed=0, sampling_defaults="openai") as llm:
        assert llm.get_server_info()["default_sampling_params"] == {}
        outs = llm.generate(["Hello there"] * 4, {"max_new_tokens": 12, "ignore_eos": True})
        assert len({tuple(o["output_ids"]) for o in outs}) > 1  # SGLang's temperature 1.0


def test_bad_values_in_generation_config_are_skipped_with_a_warning(model_with_generation_config, tmp_path, caplog):
    folder = tmp_path / "bad"
    shutil.copytree(model_with_generation_config, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": -3, "top_p": 0.5}))
    with Engine(str(folder), random_seed=0) as llm:
        assert llm.get_server_info()["default_sampling_params"] == {"top_p": 0.5}
    assert any("ignoring temperature=-3" in r.getMessage() for r in caplog.records)


def test_bad_sampling_defaults_value(tiny_llama):
    with pytest.raises(ValueError, match="sampling_defaults"):
        Engine(str(tiny_llama), sampling_defaults="greedy")
