"""Structured output (xgrammar): json_schema / regex / ebnf always hold, even sampled at temperature 1."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from nbengine.engine import Engine  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(default_model_dir):
    with Engine(str(default_model_dir), random_seed=0) as engine:
        yield engine


def test_json_schema_outputs_always_validate_at_temperature_one(llm):
    outs = llm.generate(["Describe a person as JSON:"] * 12,
                        {"temperature": 1.0, "max_new_tokens": 96, "json_schema": json.dumps(SCHEMA)})
    for o in outs:
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
        jsonschema.validate(json.loads(o["text"]), SCHEMA)


def test_regex_and_ebnf_outputs_match(llm):
    pattern = r"(\d{3}) \d{3}-\d{4}"
    outs = llm.generate(["Call me at"] * 6, {"temperature": 1.0, "max_new_tokens": 30, "regex": pattern})
    assert all(re.fullmatch(pattern, o["text"]) for o in outs), [o["text"] for o in outs]
    ebnf = 'root ::= "The answer is " ("yes" | "no") "."'
    outs = llm.generate(["Is Paris in France?"] * 4, {"temperature": 1.0, "max_new_tokens": 20, "ebnf": ebnf})
    assert {o["text"] for o in outs} <= {"The answer is yes.", "The answer is no."}


def test_an_unconstrained_request_in_the_same_batch_is_unaffected(llm):
    sp = {"temperature": 0, "max_new_tokens": 12}
    alone = llm.generate("The capital of France is", sp)
    both = llm.generate(["The capital of France is", "The capital of France is"],
                        [sp, {**sp, "regex": "[A-Z][a-z]+"}])
    assert both[0]["output_ids"] == alone["output_ids"]
    assert re.fullmatch("[A-Z][a-z]+", both[1]["text"])


@pytest.mark.parametrize("params,match", [
    ({"json_schema": "{not json"}, "Invalid json_schema"),
    ({"json_schema": json.dumps({"type": "nonsense"})}, "Invalid json_schema"),
    ({"regex": "[a-"}, "Invalid regex"),
    ({"ebnf": "root ::= undefined_rule"}, "Invalid ebnf"),
    ({"regex": "a", "json_schema": "{}"}, "Only one of"),
    ({"regex": 5}, "regex must be a string"),
])
def test_a_bad_constraint_is_refused_before_anything_is_enqueued(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["ok", "fine"], [{"max_new_tokens": 4}, {"max_new_tokens": 4, **params}])
    info = llm.get_server_info()
    assert info["num_waiting_reqs"] == info["num_running_reqs"] == 0
    assert llm.generate("Hi", {"max_new_tokens": 3})["meta_info"]["completion_tokens"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_cuda_runner_applies_the_masks_on_the_device(default_model_dir):
    with Engine(str(default_model_dir), random_seed=0, device="cuda") as gpu:
        outs = gpu.generate(["Describe a person as JSON:"] * 8,
                            {"temperature": 1.0, "max_new_tokens": 96, "json_schema": json.dumps(SCHEMA)})
        phone = gpu.generate(["Call me at"] * 4, {"temperature": 1.0, "max_new_tokens": 30, "regex": r"\d{3}-\d{4}"})
    for o in outs:
        jsonschema.validate(json.loads(o["text"]), SCHEMA)
    assert all(re.fullmatch(r"\d{3}-\d{4}", o["text"]) for o in phone)
