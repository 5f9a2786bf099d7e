"""Tools: the parser of each tool-call format (whole and streamed a character at a time), and a live daemon
on a checkpoint with a Qwen2.5-style tools template (written here with mlx-lm's classes and a byte-level
BPE tokenizer trained by `tokenizers`): tools and tool messages render as transformers renders the
template, a tool call the model writes in the template's format comes back as tool_calls (streamed and
not), and a named tool choice is forced in that format."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import openai
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from swarm.model.tokenizer import Tokenizer as SwarmTokenizer
from tests.mlxlm_reference import write_checkpoint
from tests.swarm_harness import Daemon, free_port, ready_swarm
from web.tools import HERMES, LLAMA3, MISTRAL, ToolCallParser

# Qwen2.5-Instruct's chat template, as its tokenizer_config.json carries it
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
TRAINING_TEXT = ("The weather in Paris is sunny today. Rome will have rain for three days. What is the weather? "
                 "Call the function get_weather with a city and a number of days. The answer is a JSON object. ") * 20
WEATHER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                  "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER_SCHEMA}}]
# the model's output steered into the template's format through a lark grammar (an extension of
# response_format); the markers are tokens of their own, which the model writes as such
CALL_LARK = ('start: <[{start}]> "\\n{{\\"name\\": \\"get_weather\\", \\"arguments\\": {{\\"city\\": \\"" CITY '
             '"\\", \\"days\\": " DAYS "}}}}\\n" <[{end}]>\nCITY: "Paris" | "Rome"\nDAYS: /[1-7]/\n')
CONVERSATION = [
    {"role": "system", "content": "You answer about the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": [{"type": "text", "text": "And in Rome?"}]},
]


# --- parsers -------------------------------------------------------------------------------------------

def parse(fmt, text: str, piecewise: bool) -> tuple[str, list[dict]]:
    parser, content, calls = ToolCallParser(fmt), "", []
    for piece in (list(text) if piecewise else [text]):
        c, found = parser.feed(piece)
        content, calls = content + c, calls + found
    c, found = parser.close()
    return content + c, [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls + found]


@pytest.mark.parametrize("piecewise", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("fmt, text, content, calls", [
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
             '{"name": "g", "arguments": {}}\n</tool_call>', "Let me look.\n\n", [("f", {"a": 1}), ("g", {})]),
    (HERMES, 'no calls <tool_ here', "no calls <tool_ here", []),
    (HERMES, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', "", [("f", {"a": 1})]),       # EOS before the end tag
    (HERMES, '<tool_call>\n{"name": "f", "argu</tool_call>', '<tool_call>\n{"name": "f", "argu</tool_call>', []),
    (MISTRAL, 'ok[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "x"}}]', "ok",
     [("f", {"a": 1}), ("g", {"b": "x"})]),
    (LLAMA3, '{"name": "f", "parameters": {"a": 1}}', "", [("f", {"a": 1})]),
    (LLAMA3, '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}', "",
     [("f", {"a": 1}), ("g", {})]),
    (LLAMA3, 'It is {sunny}', "It is {sunny}", []),
    (LLAMA3, '{not json', "{not json", []),
])
def test_tool_call_formats_parse_whole_and_streamed(fmt, text, content, calls, piecewise):
    assert parse(fmt, text, piecewise) == (content, calls)


# --- a checkpoint with a tools template ------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A Qwen2-shaped 4-bit checkpoint written by mlx-lm, with a byte-level BPE tokenizer and the Qwen2.5
    template: <|im_start|>/<|im_end|> special, <tool_call> and </tool_call> added as plain tokens (as Qwen has them)."""
    folder = tmp_path_factory.mktemp("qwen-tools")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TRAINING_TEXT], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken("<tool_call>", normalized=False), AddedToken("</tool_call>", normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": QWEN_TEMPLATE}))
    config = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=tok.get_vocab_size(),
                  tie_word_embeddings=True, eos_token_id=tok.token_to_id("<|im_end|>"), max_position_embeddings=2048)
    write_checkpoint(folder, config, group_size=32, dtype=mx.float32, seed=11, scaled=True)
    return folder


def transformers_text(folder, messages, tools=None) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tools=tools, tokenize=False,
                                                                         add_generation_prompt=True)


def as_template_reads_it(messages: list[dict]) -> list[dict]:
    """OpenAI's messages as templates expect them (what transformers' users pass): arguments as objects,
    text parts as text, no nulls."""
    out = []
    for m in messages:
        m = {**m, "content": m["content"] if isinstance(m["content"], str) else
             "".join(p["text"] for p in m["content"] or [])}
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def test_tools_and_tool_messages_render_as_transformers_renders_them(qwen_folder):
    ours = SwarmTokenizer.load(qwen_folder)
    messages = as_template_reads_it(CONVERSATION)
    assert ours.renders_tools
    assert ours.apply_chat_template(messages, tools=TOOLS) == transformers_text(qwen_folder, messages, TOOLS)
    assert ours.apply_chat_template(messages) == transformers_text(qwen_folder, messages)


@pytest.fixture(scope="module")
def qwen_daemon(qwen_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen-daemon")
    daemon = Daemon("q", "127.0.0.1", free_port(), ["--model", str(qwen_folder), "--no-mdns", "--speed", "1",
                                                     "--cache-dir", str(tmp / "cache")], tmp)
    with ready_swarm([daemon], nodes=1):
        yield daemon


def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)


def test_the_prompt_is_the_templates_rendering_of_openais_messages(qwen_daemon, qwen_folder):
    from transformers import AutoTokenizer

    answer = client(qwen_daemon).chat.completions.create(model="m", messages=CONVERSATION, tools=TOOLS, max_tokens=2,
                                                         extra_body={"return_token_ids": True})
    text = transformers_text(qwen_folder, as_template_reads_it(CONVERSATION), TOOLS)
    expected = AutoTokenizer.from_pretrained(str(qwen_folder))(text, add_special_tokens=False)["input_ids"]
    assert answer.model_dump()["prompt_token_ids"] == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_call_written_in_the_templates_format_comes_back_as_tool_calls(qwen_daemon, qwen_folder, stream):
    vocab = SwarmTokenizer.load(qwen_folder).backend
    grammar = CALL_LARK.format(start=vocab.token_to_id("<tool_call>"), end=vocab.token_to_id("</tool_call>"))
    args = dict(model="m", messages=CONVERSATION[:2], tools=TOOLS, max_tokens=80, temperature=1.0, seed=4,
                response_format={"type": "lark", "grammar": grammar})
    if stream:
        chunks = list(client(qwen_daemon).chat.completions.create(stream=True, **args))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        reason = chunks[-1].choices[0].finish_reason
        assert [t.index for t in calls] == [0]
    else:
        message = client(qwen_daemon).chat.completions.create(**args).choices[0]
        content, calls, reason = message.message.content, message.message.tool_calls, message.finish_reason
    assert not content and reason == "tool_calls" and len(calls) == 1
    assert calls[0].type == "function" and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_SCHEMA)


def test_a_named_tool_choice_is_forced_in_the_templates_format(qwen_daemon, qwen_folder):
    answer = client(qwen_daemon).chat.completions.create(
        model="m", messages=CONVERSATION, tools=TOOLS, max_tokens=80, temperature=1.0, seed=9,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body={"return_token_ids": True})
    call = answer.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    written = SwarmTokenizer.load(qwen_folder).decode(answer.choices[0].model_dump()["token_ids"], False)
    assert written.startswith("<tool_call>\n{") and written.removesuffix("<|im_end|>").endswith("}\n</tool_call>")
