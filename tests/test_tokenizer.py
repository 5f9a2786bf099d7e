"""swarm.model.tokenizer: chat templates rendered and tokenized as transformers does, special tokens and EOS
ids from the config files, and the streaming detokenizer on multi-byte text (byte-level BPE, byte-fallback
SentencePiece-style, and the demo's real SentencePiece vocabulary)."""

import json
from collections import Counter
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from swarm.model.convert import read_sentencepiece_model, sentencepiece_to_tokenizer_json
from swarm.model.tokenizer import ChatTemplateError, Tokenizer
from tests.checkpoints import require_demo


# The chat templates as published: Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json (the same template as the
# other Qwen2.5 Instruct sizes) and meta-llama/Llama-3.2-1B-Instruct's.
QWEN25_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"  # noqa: E501

LLAMA32_TEMPLATE = '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0][\'role\'] == \'system\' %}\n    {%- set system_message = messages[0][\'content\']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n{#- System message #}\n{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0][\'content\']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n{%- endif %}\n    {{- \'<|start_header_id|>user<|end_header_id|>\\n\\n\' -}}\n    {{- "Given the following functions, please respond with a JSON for a function call " }}\n    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == \'ipython\' or message.role == \'tool\' or \'tool_calls\' in message) %}\n        {{- \'<|start_header_id|>\' + message[\'role\'] + \'<|end_header_id|>\\n\\n\'+ message[\'content\'] | trim + \'<|eot_id|>\' }}\n    {%- elif \'tool_calls\' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' -}}\n        {{- \'{"name": "\' + tool_call.name + \'", \' }}\n        {{- \'"parameters": \' }}\n        {{- tool_call.arguments | tojson }}\n        {{- "}" }}\n        {{- "<|eot_id|>" }}\n    {%- elif message.role == "tool" or message.role == "ipython" %}\n        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' }}\n{%- endif %}\n'  # noqa: E501

CORPUS = [
    "Hello world! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.\nA second line, with numbers 12345.",
    "Le système est naïf : café, crème brûlée, déjà vu. Ça va très bien.",
    "中文的文本，日本語のテキスト、한국어 텍스트。中文中文中文",
    "Emoji: 😀😀 👍🏽 🇫🇷 ❤️ 🎉 — and “quotes” … done.",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>"]

MULTI_BYTE = ["naïve café — déjà vu 😀👍🏽 中文的文本\n\n日本語のテキスト 🇫🇷 ❤️ end",
              "😀", "\n中", "é\n😀\n中文 e\u0301 👨‍👩‍👧", "  two leading spaces and a trailing one "]


# --- tokenizers built with the `tokenizers` library ------------------------------------------------------

def train_bpe(words: list[str], vocab: dict[str, int], merges_wanted: int) -> tuple[dict, list]:
    """BPE merges learnt from `words`, most frequent pair first, ties to the smallest pair. (The `tokenizers`
    trainer breaks ties in hash order, so its vocabulary changes from run to run.)"""
    vocab, merges = dict(vocab), []
    seqs = Counter(tuple(w) for w in words)
    for _ in range(merges_wanted):
        pairs = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
        merged = Counter()
        for seq, n in seqs.items():
            out, k = [], 0
            while k < len(seq):
                if seq[k:k + 2] == (a, b):
                    out.append(a + b)
                    k += 2
                else:
                    out.append(seq[k])
                    k += 1
            merged[tuple(out)] += n
        seqs = merged
    return vocab, merges


@lru_cache(maxsize=None)
def byte_level_json(specials: tuple[str, ...], bos: str | None = None) -> str:
    """A GPT-2-style byte-level BPE learnt from CORPUS; small, so CJK and emoji split inside characters."""
    split = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [w for line in CORPUS for w, _ in split.pre_tokenize_str(line)]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = train_bpe(words, {c: i for i, c in enumerate(alphabet)}, 160)
    tok = Backend(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    if bos:  # as Llama 3's tokenizer.json: BOS added by the post-processor
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok.to_str()


@lru_cache(maxsize=None)
def byte_fallback_json() -> str:
    """A SentencePiece-style BPE laid out as Llama 2's tokenizer.json: <unk> <s> </s>, the 256 <0xNN> byte
    tokens, then pieces; ▁ for spaces, byte fallback, and the decoder chain Replace(▁ -> space), ByteFallback,
    Fuse, Strip(one leading space). It knows é and 中 but no emoji and no other CJK: those become bytes."""
    text = [line for line in CORPUS if line.isascii() or "café" in line] + ["é 中"]
    words = [w for line in text for w, _ in pre_tokenizers.Metaspace().pre_tokenize_str(line)]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for c in sorted(set("".join(words))):
        vocab[c] = len(vocab)
    vocab, merges = train_bpe(words, vocab, 120)
    tok = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tok.to_str()


@lru_cache(maxsize=None)
def demo_sentencepiece_json() -> str:
    """The demo's real SentencePiece vocabulary (stories260K, 512 pieces, byte fallback)."""
    return sentencepiece_to_tokenizer_json(read_sentencepiece_model(require_demo() / "tok512.model"))


def write_folder(folder: Path, tokenizer_json: str, tokenizer_config: dict, config: dict | None = None,
                 generation_config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False))
    for name, content in (("config.json", config), ("generation_config.json", generation_config)):
        if content is not None:
            (folder / name).write_text(json.dumps(content))
    return folder


def ids_of(tokenizer_json: str, *tokens: str) -> list[int]:
    backend = Backend.from_str(tokenizer_json)
    return [backend.token_to_id(t) for t in tokens]


QWEN_SPECIAL_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
LLAMA_SPECIAL_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def qwen_json() -> str:
    return byte_level_json(tuple(QWEN_SPECIALS))


def llama_json() -> str:
    return byte_level_json(tuple(LLAMA_SPECIALS), bos="<|begin_of_text|>")


@pytest.fixture
def qwen(tmp_path):
    """(ours, transformers') for a Qwen2.5-Instruct-like folder."""
    tj = qwen_json()
    endoftext, im_end = ids_of(tj, "<|endoftext|>", "<|im_end|>")
    folder = write_folder(
        tmp_path / "qwen", tj,
        {"add_bos_token": False, "bos_token": None, "chat_template": QWEN25_TEMPLATE, "unk_token": None,
         "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer", **QWEN_SPECIAL_TOKENS},
        config={"model_type": "qwen2", "bos_token_id": endoftext, "eos_token_id": im_end},
        generation_config={"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext]})
    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tj), chat_template=QWEN25_TEMPLATE,
                                 **QWEN_SPECIAL_TOKENS)
    return Tokenizer.load(folder), hf


@pytest.fixture
def llama(tmp_path):
    """(ours, transformers') for a Llama-3.2-Instruct-like folder."""
    tj = llama_json()
    end_of_text, eom, eot = ids_of(tj, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    folder = write_folder(
        tmp_path / "llama", tj,
        {"chat_template": LLAMA32_TEMPLATE, "clean_up_tokenization_spaces": True,
         "tokenizer_class": "PreTrainedTokenizerFast", **LLAMA_SPECIAL_TOKENS},
        config={"model_type": "llama", "eos_token_id": [end_of_text, eom, eot]})
    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tj), chat_template=LLAMA32_TEMPLATE,
                                 **LLAMA_SPECIAL_TOKENS)
    return Tokenizer.load(folder), hf


CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are a terse assistant. Réponds en français."},
        {"role": "user", "content": "Hello! What is 中文?"},
        {"role": "assistant", "content": "Chinese 😀.\nSecond line."},
        {"role": "user", "content": "  And déjà vu?  "},
    ],
    "single_user": [{"role": "user", "content": "Hi"}],
    "no_system_two_turns": [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time."},
        {"role": "user", "content": "More."},
    ],
}
PINNED = {"date_string": "26 Jul 2024"}  # the Llama template otherwise prints today's date


# --- chat templates ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen", "llama"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_text_and_ids_match_transformers(request, family, conversation, add_generation_prompt):
    ours, hf = request.getfixturevalue(family)
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                      **PINNED)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **PINNED) == expected
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          **PINNED)["input_ids"]
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt, **PINNED) == expected_ids


def test_rendering_is_the_published_prompt_format(qwen, llama):
    # guards the template strings above as much as the renderer
    assert qwen[0].apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert llama[0].apply_chat_template([{"role": "system", "content": " Be brief. "},
                                         {"role": "user", "content": "Hi"}], **PINNED) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_encode_chat_has_one_bos_although_the_post_processor_adds_one(llama):
    ours, _ = llama
    bos = ours.bos_token_id
    ids = ours.encode_chat(CONVERSATIONS["single_user"], **PINNED)
    assert ids[0] == bos and ids[1] != bos
    assert ours.encode("Hi")[0] == bos  # plain encode keeps the tokenizer's own BOS


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville — «actuelle» & <exacte>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "nom, e.g. Zürich"}},
                   "required": ["city"]}}}]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}


def test_tools_and_tool_calls_match_transformers(qwen, llama):
    qwen_chat = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Weather in Zürich?"},
                 {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                 {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": "sunny"}]
    llama_chat = [{"role": "user", "content": "Weather in Zürich?"},
                  {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                  {"role": "tool", "content": {"temp": 21}}]
    for (ours, hf), chat in ((qwen, qwen_chat), (llama, llama_chat)):
        for extra in ({}, {"tools_in_user_message": False}):
            expected = hf.apply_chat_template(chat, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                              **PINNED, **extra)
            assert ours.apply_chat_template(chat, tools=TOOLS, **PINNED, **extra) == expected
    assert "Zürich" in expected and "«actuelle» & <exacte>" in expected  # tojson keeps non-ASCII and HTML as is


def test_llama_template_prints_today_by_default(llama):
    ours, hf = llama
    before = datetime.now().strftime("%d %b %Y")
    text = ours.apply_chat_template(CONVERSATIONS["single_user"])
    expected = hf.apply_chat_template(CONVERSATIONS["single_user"], tokenize=False, add_generation_prompt=True)
    if datetime.now().strftime("%d %b %Y") != before:
        pytest.skip("the date changed while rendering")
    assert text == expected and f"Today Date: {before}\n" in text


def test_raise_exception_in_a_template_is_a_chat_template_error(llama):
    ours, hf = llama
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [TOOL_CALL, TOOL_CALL]}]
    with pytest.raises(jinja2.TemplateError, match="single tool-calls"):
        hf.apply_chat_template(chat, tokenize=False, **PINNED)
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        ours.apply_chat_template(chat, **PINNED)


def test_transformers_environment_details(tmp_path):
    # generation blocks, loop controls, tojson options, None values dropped, reasoning aliases, a custom kwarg
    template = (
        "{% for m in messages %}{% if loop.index0 > 2 %}{% break %}{% endif %}"
        "{{ m.role }}:{{ m.content }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.tool_calls is defined }}\n"
        "{% if m.role == 'assistant' %}{% generation %}[{{ m.content | tojson }}]{% endgeneration %}{% endif %}"
        "{% endfor %}{{ {'b': [1, 'é'], 'a': '<&>'} | tojson(indent=2, sort_keys=True) }}"
        "{{ extra_flag }}\n"
        "  {% if add_generation_prompt %}\n"  # trim_blocks and lstrip_blocks decide the whitespace here
        "    >>\n"
        "  {% endif %}\n"
        "end")
    chat = [{"role": "user", "content": "q", "tool_calls": None},
            {"role": "assistant", "content": "a \"quoted\"", "reasoning": "thought"},
            {"role": "assistant", "content": "b", "thinking": "own", "reasoning_content": "rc"},
            {"role": "user", "content": "never rendered"}]
    tj = qwen_json()
    ours = Tokenizer.load(write_folder(tmp_path, tj, {"chat_template": template, **QWEN_SPECIAL_TOKENS}))
    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tj), chat_template=template, **QWEN_SPECIAL_TOKENS)
    for gen in (True, False):
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, extra_flag="!")
        assert ours.apply_chat_template(chat, add_generation_prompt=gen, extra_flag="!") == expected
    assert "assistant:a \"quoted\"|thought|thought|False" in expected and "never" not in expected


def test_chat_template_file_and_named_templates(tmp_path):
    tj = qwen_json()
    folder = write_folder(tmp_path, tj, {"chat_template": [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"}], **QWEN_SPECIAL_TOKENS})
    ours = Tokenizer.load(folder)
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS) == "T1"
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}")  # newer transformers' separate file wins
    assert Tokenizer.load(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "J<|im_end|>"


def test_special_tokens_eos_ids_and_vocab(qwen, llama):
    tj = qwen_json()
    ours, hf = qwen
    assert ours.bos_token_id is None
    assert ours.eos_token_ids == set(ids_of(tj, "<|im_end|>", "<|endoftext|>"))  # config + generation_config
    assert ours.vocab_size == len(hf) == Backend.from_str(tj).get_vocab_size(with_added_tokens=True)
    ours, hf = llama
    assert ours.bos_token_id == hf.bos_token_id == ids_of(llama_json(), "<|begin_of_text|>")[0]
    assert ours.eos_token_ids == set(ids_of(llama_json(), "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert ours.has_chat_template


ENCODE_TEXTS = MULTI_BYTE + ["Hello world . How are you ?", "", "<|eot_id|> inside text <s>"]


def check_encode_decode(ours: Tokenizer, hf) -> None:
    for text in ENCODE_TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("add_eos", [True, False])
def test_encode_decode_match_transformers_loading_the_same_folder(tmp_path, add_bos, add_eos):
    # tokenizer.json's post-processor adds BOS; transformers (5) then ignores add_bos_token, and so do we
    folder = write_folder(tmp_path, llama_json(), {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": True, **LLAMA_SPECIAL_TOKENS})
    ours, hf = Tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    check_encode_decode(ours, hf)
    ids = ours.encode("Hi")
    assert ids[0] == ours.bos_token_id and ids[-1] not in ours.eos_token_ids


def test_added_and_special_tokens_from_the_config_join_the_vocabulary(tmp_path):
    tj = byte_fallback_json()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "added_tokens_decoder": {
                  "400": {"content": "<tool>", "special": True, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False},
                  "401": {"content": "<plain>", "special": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False}}}
    folder = write_folder(tmp_path, tj, config)
    assert Backend.from_str(tj).token_to_id("<tool>") is None
    ours, hf = Tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.vocab_size == len(hf) == Backend.from_str(tj).get_vocab_size(with_added_tokens=True) + 3
    for text in ("call <tool> now<pad>", "keep <plain> this"):
        ids = ours.encode(text)
        assert ids == hf.encode(text) and len(ids) < len(ours.encode(text.replace("<", "< ")))
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert "<tool>" not in ours.decode(ours.encode("a <tool> b")) and "<plain>" in ours.decode(ours.encode("<plain>"))


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("add_eos", [True, False])
def test_without_a_post_processor_add_bos_token_decides(tmp_path, add_bos, add_eos):
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    folder = write_folder(tmp_path, byte_fallback_json(), {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
        **special}, config={"eos_token_id": 2})
    ours = Tokenizer.load(folder)
    hf = PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(byte_fallback_json()), add_bos_token=add_bos,
                                 add_eos_token=add_eos, **special)
    check_encode_decode(ours, hf)
    ids = ours.encode("Hi")
    assert (ids[0] == 1, ids[-1] == 2) == (add_bos, add_eos)
    assert ours.eos_token_ids == {2}


def test_without_a_chat_template_messages_become_a_plain_prompt(tmp_path):
    folder = write_folder(tmp_path, byte_fallback_json(), {"bos_token": "<s>", "eos_token": "</s>",
                                                          "add_bos_token": True})
    ours = Tokenizer.load(folder)
    assert not ours.has_chat_template
    messages = [{"role": "user", "content": "Once upon"},
                {"role": "user", "content": [{"type": "text", "text": "a time"}]}]  # OpenAI content parts
    assert ours.apply_chat_template(messages) == "Once upon\na time"
    assert ours.encode_chat(messages) == ours.encode("Once upon\na time") and ours.encode_chat(messages)[0] == 1


def test_a_folder_without_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


# --- streaming detokenizer -------------------------------------------------------------------------------

def stream(tokenizer: Tokenizer, ids, skip_special_tokens=True) -> tuple[list[str], str]:
    detok = tokenizer.detokenizer(skip_special_tokens)
    chunks = [detok.add(i) for i in ids]
    return chunks, detok.finalize()


@lru_cache(maxsize=None)
def backend_tokenizer(kind: str) -> Tokenizer:
    tj = {"byte_level": qwen_json, "byte_fallback": byte_fallback_json, "demo": demo_sentencepiece_json}[kind]()
    return Tokenizer(Backend.from_str(tj))


KINDS = ["byte_level", "byte_fallback", "demo"]


def check_stream(tok: Tokenizer, text: str) -> list[str]:
    ids = tok.encode(text, add_special_tokens=False)
    chunks, rest = stream(tok, ids)
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + rest == tok.decode(ids)
    assert rest == ""  # valid text: nothing is left once every id is in
    return chunks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", MULTI_BYTE)
def test_stream_never_splits_a_character(kind, text):
    check_stream(backend_tokenizer(kind), text)


@pytest.mark.parametrize("kind", KINDS)
def test_the_examples_do_split_characters_across_tokens(kind):
    # otherwise the tests above would prove nothing
    tok = backend_tokenizer(kind)
    ids = tok.encode(MULTI_BYTE[0], add_special_tokens=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4
    if kind != "byte_level":
        assert any(tok.backend.id_to_token(i).startswith("<0x") for i in ids)


def test_stream_pieces_with_sentencepiece_spaces():
    # the first token's dummy-prefix space is stripped, a later token's ▁ is a space; the emoji waits for its
    # four byte tokens
    tok = backend_tokenizer("byte_fallback")
    ids = tok.encode("Hello world 😀!", add_special_tokens=False)
    assert [tok.backend.id_to_token(i) for i in ids][:2] == ["▁Hello", "▁w"]
    assert stream(tok, ids) == (["Hello", " w", "or", "l", "d", " ", "", "", "", "😀", "!"], "")


def test_stream_pieces_with_byte_level_tokens_cut_inside_a_character():
    tok = backend_tokenizer("byte_level")
    ids = tok.encode("Hello world 😀!")
    assert [tok.backend.id_to_token(i) for i in ids][-3:] == ["ĠðŁ", "ĺĢ", "!"]  # " " + 😀's bytes: 2 + 2
    assert stream(tok, ids) == (["Hello", " w", "orld", "", " 😀", "!"], "")


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(KINDS), text=st.text(st.one_of(
    st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"),
    st.sampled_from(list("é中文😀👍🏽\n ▁~")))))
def test_stream_equals_decode_on_random_unicode(kind, text):
    tok = backend_tokenizer(kind)
    check_stream(tok, text)
    if kind == "byte_level":
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(draws=st.lists(st.integers(0, 10**6), max_size=30), skip=st.booleans())
def test_stream_equals_decode_on_random_byte_level_ids(draws, skip):
    # any ids, invalid UTF-8 and special tokens included: byte-level decoding never revises sent text
    tok = backend_tokenizer("byte_level")
    ids = [d % tok.vocab_size for d in draws]
    chunks, rest = stream(tok, ids, skip)
    assert "".join(chunks) + rest == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_skipped_or_kept_as_decode_does():
    tok = backend_tokenizer("byte_level")
    im_start, im_end = ids_of(qwen_json(), "<|im_start|>", "<|im_end|>")
    ids = [im_start] + tok.encode("中文 ok") + [im_end] + tok.encode("😀 after")
    for skip in (True, False):
        chunks, rest = stream(tok, ids, skip)
        assert "".join(chunks) + rest == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in "".join(stream(tok, ids, False)[0])


def test_an_unfinished_character_is_held_then_flushed_as_decode_does():
    tok = backend_tokenizer("byte_fallback")
    byte = {b: tok.backend.token_to_id(f"<0x{b:02X}>") for b in "中".encode()}
    ids = tok.encode("a", add_special_tokens=False) + [byte[0xE4], byte[0xB8]]
    chunks, rest = stream(tok, ids)
    assert chunks[-2:] == ["", ""] and "\ufffd" in rest
    assert "".join(chunks) + rest == tok.decode(ids)
    chunks, rest = stream(tok, ids + [byte[0xAD]])
    assert chunks[-1] == "中" and rest == ""


class CountingTokenizer(Tokenizer):
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, backend):
        super().__init__(backend)
        self.lengths = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_each_step_decodes_a_short_window(kind):
    tok = CountingTokenizer(Backend.from_str(backend_tokenizer(kind).backend.to_str()))
    ids = tok.encode("\n".join(MULTI_BYTE + CORPUS) * 20, add_special_tokens=False)
    assert len(ids) > 2000
    chunks, rest = stream(tok, ids)
    assert "".join(chunks) + rest == tok.decode(ids)
    assert max(tok.lengths[:-1]) <= 12  # a character's bytes plus the previous piece, never the history
