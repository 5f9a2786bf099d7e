"""A checkpoint's config.json as the switches of the one decoder (llama, qwen2, qwen3, mistral)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


class ModelError(ValueError):
    """A checkpoint the engine cannot run: the message names the file and, where one is at fault, the tensor."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int = 0          # 0: same as num_attention_heads
    head_dim: int = 0                     # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict | None = None
    tie_word_embeddings: bool | None = None   # None: tied when the checkpoint has no lm_head
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    quantization: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.num_key_value_heads:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def quant_params(self, module: str) -> tuple[int, int]:
        """(group_size, bits) for a module path; per-module entries override the defaults."""
        q = self.quantization or {}
        own = q.get(module)
        own = own if isinstance(own, dict) else {}
        return int(own.get("group_size", q.get("group_size", 64))), int(own.get("bits", q.get("bits", 4)))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ModelError(f"{source}: unknown model_type {model_type!r} (this engine runs {', '.join(FAMILIES)})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in raw.items() if k in names and v is not None and k != "extra"}
        eos = raw.get("eos_token_id")
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        kw["quantization"] = raw.get("quantization") or raw.get("quantization_config")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
                   if k not in kw]
        if missing:
            raise ModelError(f"{source}: missing {', '.join(missing)}")
        kw["extra"] = {k: v for k, v in raw.items() if k not in names}
        try:
            return cls(**kw)
        except (TypeError, ZeroDivisionError) as e:
            raise ModelError(f"{source}: {e}") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: not found (is {model_dir} an MLX checkpoint folder?)") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, str(path))
