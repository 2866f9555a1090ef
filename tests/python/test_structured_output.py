"""Structured output (SamplingParams.structured_outputs, vLLM's StructuredOutputsParams) and the other token
constraints of SamplingParams (logit_bias, allowed_token_ids, bad_words): on tiny random models, whose free
text is noise, so only the grammar makes the output valid, and on the default model."""

import json
import re

import jsonschema
import pytest

from metal_engine import LLM, SamplingParams, StructuredOutputsParams
from tiny_models import make_tiny_text_checkpoint

PERSON = {  # nested objects, enums, arrays, numbers; bounded so a random model finishes
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "weight": {"type": "number", "enum": [0.25, 1.5, -3]},  # a random model's free number never ends
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "weight", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {"type": "array", "prefixItems": [
        {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "integer", "minimum": -9, "maximum": 0}],
        "items": False}}, "required": ["kind", "xy"], "additionalProperties": False},
    {"anyOf": [{"type": "boolean"}, {"enum": [1, 2, 3]}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_text_checkpoint(tmp_path_factory.mktemp("so") / "ck", "llama", seed=1)
    return LLM(str(path), dtype="float32", progress=False)


def generate(llm, prompts, **kw):
    kw.setdefault("max_tokens", 160)
    return [o.outputs[0] for o in llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "int-array", "tuple", "any-of"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_is_valid(tiny, schema, temperature):
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    outs = generate(tiny, ["Hello", "The quick brown fox", "def f(x):"], temperature=temperature, seed=4,
                    structured_outputs=so)
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_unconstrained_tiny_model_output_is_not_json(tiny):
    """The control: without the grammar, the tiny model's text is no JSON (so the tests above prove the grammar)."""
    [c] = generate(tiny, ["Hello"], temperature=0.0, max_tokens=30)
    with pytest.raises(ValueError):
        json.loads(c.text)


def test_regex_choice_grammar_and_json_object(tiny):
    prompts = ["Hello", "Paris is"]
    for c in generate(tiny, prompts, temperature=1.0, seed=2,
                      structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) and c.finish_reason == "stop"
    for c in generate(tiny, prompts, temperature=1.0, seed=2,
                      structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe so"])):
        assert c.text in ("yes", "no", "maybe so")
    lark = 'start: "x" ("y" | "z")+ "!"'
    for c in generate(tiny, prompts, temperature=1.0, seed=2, structured_outputs=StructuredOutputsParams(grammar=lark)):
        assert re.fullmatch(r"x[yz]+!", c.text)
    gbnf = 'root ::= "a" [0-9] [0-9]? "b"'  # llama.cpp's GBNF
    for c in generate(tiny, prompts, temperature=1.0, seed=2, structured_outputs=StructuredOutputsParams(grammar=gbnf)):
        assert re.fullmatch(r"a[0-9]{1,2}b", c.text)
    for c in generate(tiny, prompts, temperature=0.0,
                      structured_outputs=StructuredOutputsParams(json_object=True, disable_any_whitespace=True)):
        assert isinstance(json.loads(c.text), dict)
    # a dict of the fields works as well (vLLM's server passes one)
    [c] = generate(tiny, ["Hello"], temperature=0.0, structured_outputs={"choice": ["left", "right"]})
    assert c.text in ("left", "right")


def test_a_batch_mixing_constrained_and_free_rows_gives_each_row_its_solo_output(tiny):
    rows = [
        ("Hello", None),
        ("Paris is", StructuredOutputsParams(json=SCHEMAS[1], disable_any_whitespace=True)),
        ("def f(x):", StructuredOutputsParams(regex=r"[a-c]{2,5}")),
        ("The quick", None),
        ("Berlin", StructuredOutputsParams(choice=["one", "two"])),
    ]
    params = [SamplingParams(max_tokens=24, temperature=0.0, structured_outputs=so) for _, so in rows]
    batched = tiny.generate([p for p, _ in rows], params, use_tqdm=False)
    for (prompt, _), sp, out in zip(rows, params, batched):
        [alone] = tiny.generate([prompt], sp, use_tqdm=False)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    # and the free rows are what they are without any constrained neighbour
    free = tiny.generate(["Hello", "The quick"], SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in free] == [batched[0].outputs[0].token_ids, batched[3].outputs[0].token_ids]


def test_n_samples_each_follow_the_grammar(tiny):
    [out] = tiny.generate(["Hello"], SamplingParams(n=3, max_tokens=60, temperature=1.0, seed=9,
                                                    structured_outputs=StructuredOutputsParams(json=SCHEMAS[1])),
                          use_tqdm=False)
    assert len(out.outputs) == 3
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS[1])


def test_preempted_constrained_requests_stay_valid(tmp_path):
    """A KV cache too small for every request at once: requests are preempted and recomputed mid-output;
    their matchers keep what they consumed, and every output is still schema-valid."""
    path = make_tiny_text_checkpoint(tmp_path / "ck", "llama", seed=1)
    llm = LLM(str(path), dtype="float32", progress=False, num_kv_blocks=12, block_size=8, max_model_len=96)
    schema = SCHEMAS[2]
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    outs = llm.generate(["Hello there"] * 6, SamplingParams(max_tokens=80, temperature=1.0, seed=3,
                                                            structured_outputs=so), use_tqdm=False)
    assert llm.llm_engine.stats["num_preemptions"] > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), schema)


@pytest.mark.parametrize("so,message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "invalid structured_outputs json"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(regex="[a-"), "invalid structured_outputs regex"),
    (dict(grammar="start: undefined_rule"), "invalid structured_outputs grammar"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(json={"type": "object"}, regex="a"), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(regex="a", whitespace_pattern=r"\s*"), "whitespace_pattern is not supported"),
])
def test_invalid_constraints_are_value_errors_naming_them(tiny, so, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(["Hello"], SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    assert not tiny.llm_engine.has_unfinished_requests()  # nothing was enqueued


def test_default_model_answers_in_the_schema():
    """The real model, asked for JSON, fills the schema with sensible values (greedy)."""
    llm = LLM(progress=False)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    [out] = llm.chat([{"role": "user", "content": "Describe Paris as JSON with city, country and population."}],
                     SamplingParams(max_tokens=80, temperature=0.0,
                                    structured_outputs=StructuredOutputsParams(json=schema)), use_tqdm=False)
    value = json.loads(out.outputs[0].text)
    jsonschema.validate(value, schema)
    assert value["city"] == "Paris" and out.outputs[0].finish_reason == "stop"


# ------------------------------------------------------------------ logit_bias, allowed_token_ids, bad_words
def test_logit_bias_and_allowed_token_ids(tiny):
    [free] = generate(tiny, ["Hello"], temperature=0.0, max_tokens=6)
    first = free.token_ids[0]
    [biased] = generate(tiny, ["Hello"], temperature=0.0, max_tokens=6, logit_bias={first: -100, 17: 100})
    assert biased.token_ids[0] == 17
    allowed = [5, 9, 40]
    [c] = generate(tiny, ["Hello"], temperature=1.0, seed=1, max_tokens=12, allowed_token_ids=allowed)
    assert set(c.token_ids) <= set(allowed)


def test_bad_words_are_never_generated(tiny):
    """vLLM's bad_words are token sequences (the word alone and after a space): none occurs in the output,
    though the free greedy output has the word."""
    tok = tiny.get_tokenizer()
    [free] = generate(tiny, ["Hello"], temperature=0.0, max_tokens=16)
    word = next(w for w in (tok.decode([t]) for t in free.token_ids) if w.strip().isalpha())
    [c] = generate(tiny, ["Hello"], temperature=0.0, max_tokens=16, bad_words=[word.strip()])
    variants = [tok.encode(v, add_special_tokens=False) for v in (word.strip(), " " + word.strip())]

    def occurs(seq, ids):
        return any(ids[i:i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))

    assert any(occurs(v, free.token_ids) for v in variants)
    assert not any(occurs(v, c.token_ids) for v in variants)


@pytest.mark.parametrize("kw,message", [
    (dict(logit_bias={10**6: 1.0}), "logit_bias token id 1000000 is outside the vocabulary"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids -1 is outside the vocabulary"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list"),
    (dict(bad_words=[""]), "bad_words must be a list of non-empty strings"),
])
def test_bad_token_constraints_are_refused(tiny, kw, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(["Hello"], SamplingParams(max_tokens=4, **kw), use_tqdm=False)


def test_grammar_wins_over_min_tokens(tiny):
    """min_tokens bans end-of-sequence, which the finished grammar alone allows: the grammar wins, the output
    is the choice and ends there."""
    [c] = generate(tiny, ["Hello"], temperature=0.0, max_tokens=10, min_tokens=5,
                   structured_outputs=StructuredOutputsParams(choice=["ok"]))
    assert c.text == "ok"  # then end-of-sequence tokens (hidden), the only ones the grammar allows
    assert len(c.token_ids) >= 5
