"""Shape and numerics of the decoder (Llama family and GPT-2), plus named presets."""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxlm.layers.attention import ATTENTION_IMPLS
from jaxlm.layers.flash_kernels import window_problem
from jaxlm.layers.remat import POLICIES as REMAT_POLICIES

NORM_TYPES = ("rms", "layer")
POSITION_EMBEDDINGS = ("rope", "learned")
MLP_TYPES = ("swiglu", "gelu")
CLASSIFIERS = ("sequence", "token", "regression")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The decoder's architecture. The defaults are Llama's; GPT-2 is norm_type="layer",
  position_embedding="learned", mlp_type="gelu" with every bias on (see the gpt2 preset)."""
  vocab_size: int = 32000
  hidden_size: int = 2048
  num_layers: int = 16
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int | None = None  # None: hidden_size // num_heads
  mlp_dim: int = 7168
  rope_theta: float = 10000.0
  # None, or a dict in Hugging Face's layout, e.g. {"rope_type": "llama3", "factor": 32.0,
  # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  # or {"rope_type": "linear", "factor": 2.0}.
  # Stored as sorted (key, value) pairs so the config stays hashable (jit static args).
  rope_scaling: dict[str, Any] | tuple | None = None
  max_seq_len: int = 2048
  norm_eps: float = 1e-5
  norm_type: str = "rms"  # rms | layer (LayerNorm with a bias, GPT-2)
  # rope | learned (an absolute table of max_seq_len positions added to the embeddings, GPT-2)
  position_embedding: str = "rope"
  mlp_type: str = "swiglu"  # swiglu | gelu (tanh approximation, GPT-2's "gelu_new")
  qkv_bias: bool = False  # Qwen2, GPT-2
  attention_out_bias: bool = False  # GPT-2
  mlp_bias: bool = False  # GPT-2
  sliding_window: int | None = None  # Mistral: a token sees itself and the window-1 before it
  # True: attention stays inside each document (segment) of a packed row. False: a row is
  # one causal stream whatever its segment ids say, as data.shaping "stream" rows are (set
  # from it, config.model_config); on a GPU cuDNN's attention then needs no mask.
  document_mask: bool = True
  tie_embeddings: bool = False
  # > 0: a classifier: a `score` projection to num_labels classes replaces the output
  # projection to the vocabulary. classifier "sequence" (HF *ForSequenceClassification) is
  # read at a text's last token; "token" (HF *ForTokenClassification, e.g. NER) at every token
  # and, as in transformers, has a bias. "regression" (HF *ForSequenceClassification with
  # problem_type "regression", e.g. STS-B) is a sequence head with one output (num_labels=1),
  # a score trained by squared error.
  num_labels: int = 0
  classifier: str = "sequence"
  dropout_rate: float = 0.0
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  # True: the projections' weight gradients leave their matmuls in float32, not the compute
  # dtype, so the sum of each device's share of the batch across data / fsdp runs in
  # float32, as in Megatron-LM and PyTorch FSDP with reduce_dtype=float32. It costs
  # communication (planned for Llama 3 8B on 8 devices: +31% bytes under fsdp=8, +77% under
  # data=8; README, "Model presets"), no saved activations, and no matmul work.
  float32_weight_grads: bool = False
  scan_layers: bool = True
  # none | full | dots | minimal: what each layer keeps for the backward pass (layers/remat.py)
  remat_policy: str = "full"
  # None: cuDNN flash attention on GPU, XLA elsewhere; or "xla" / "cudnn" explicitly.
  attention_impl: str | None = None
  init_std: float = 0.02

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    problems = []
    if self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                      f"({self.num_kv_heads}) for grouped-query attention")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      problems.append(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                      f"({self.num_heads}); set head_dim explicitly")
    for name, allowed in (("norm_type", NORM_TYPES), ("mlp_type", MLP_TYPES),
                          ("position_embedding", POSITION_EMBEDDINGS),
                          ("classifier", CLASSIFIERS), ("remat_policy", tuple(REMAT_POLICIES)),
                          ("attention_impl", ATTENTION_IMPLS)):
      if getattr(self, name) not in allowed:
        problems.append(f"{name}={getattr(self, name)!r} (choose one of "
                        f"{', '.join(map(str, allowed))})")
    if problem := window_problem(self.attention_impl, self.sliding_window):
      problems.append(problem.removesuffix("."))
    if self.head_dim is not None and self.head_dim % 2 and self.position_embedding == "rope":
      problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
    if self.num_labels < 0:
      problems.append(f"num_labels ({self.num_labels}) must be 0 (a language model) or more")
    if self.classifier == "regression" and self.num_labels > 1:
      problems.append(f"a regression head predicts one number: set num_labels=1, not "
                      f"{self.num_labels}")
    if problems:
      raise ValueError("Invalid model config: " + "; ".join(problems))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def num_params(self, include_embedding: bool = True) -> int:
    """All parameters, or without the embedding lookups (token and position tables) those
    that do matmul work."""
    d, hd, m = self.hidden_size, self.resolved_head_dim, self.mlp_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += hd * (self.num_heads + 2 * self.num_kv_heads)
    if self.attention_out_bias:
      attn += d
    mlp = (3 if self.mlp_type == "swiglu" else 2) * d * m
    if self.mlp_bias:
      mlp += (2 if self.mlp_type == "swiglu" else 1) * m + d
    norm = d if self.norm_type == "rms" else 2 * d
    total = self.num_layers * (attn + mlp + 2 * norm) + norm  # + final norm
    score_bias = self.num_labels if self.classifier == "token" else 0
    output = (self.num_labels * d + score_bias if self.num_labels else
              0 if self.tie_embeddings else self.vocab_size * d)
    embedding = self.vocab_size * d
    if self.position_embedding == "learned":
      embedding += self.max_seq_len * d
    if include_embedding:
      return total + output + embedding
    # With tied embeddings the shared matrix still does the output projection's work.
    return total + (self.num_labels * d + score_bias if self.num_labels else
                    self.vocab_size * d)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (no input embedding lookup) plus causal
    attention counted once, 6 x layers x seq x (heads x head_dim): the QK^T and AV matmuls
    (2 x 2 x s x d each forward, x3 for backward) halved for the causal mask."""
    attention = 6 * self.num_layers * seq_len * self.num_heads * self.resolved_head_dim
    return 6 * self.num_params(include_embedding=False) + attention

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    # Small enough for unit tests on two CPU cores.
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, mlp_dim=128, max_seq_len=128, rope_theta=10000.0,
                        compute_dtype="float32", remat_policy="none"),
    # The embedded demo: trains visibly on a laptop CPU within minutes.
    "demo": LlamaConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
                        num_kv_heads=4, mlp_dim=768, max_seq_len=256, tie_embeddings=True,
                        remat_policy="none"),
    # The reference model of DESIGN.md's performance table.
    "ref-1.1b": LlamaConfig(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16,
                            num_kv_heads=16, mlp_dim=7168, max_seq_len=2048),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, mlp_dim=8192, rope_theta=500000.0, max_seq_len=131072, norm_eps=1e-5,
        tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        mlp_dim=14336, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5),
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        mlp_dim=11008, rope_theta=10000.0, max_seq_len=4096, norm_eps=1e-5),
    "mistral-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        mlp_dim=14336, rope_theta=10000.0, max_seq_len=32768, norm_eps=1e-5,
        sliding_window=4096),
    "qwen2-0.5b": LlamaConfig(
        vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        mlp_dim=4864, rope_theta=1000000.0, max_seq_len=32768, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True),
    "qwen2-7b": LlamaConfig(
        vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        mlp_dim=18944, rope_theta=1000000.0, max_seq_len=32768, norm_eps=1e-6, qkv_bias=True),
    # GPT-2 small (124M), as openai-community/gpt2.
    "gpt2": LlamaConfig(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
        mlp_dim=3072, max_seq_len=1024, norm_type="layer", norm_eps=1e-5,
        position_embedding="learned", mlp_type="gelu", qkv_bias=True, attention_out_bias=True,
        mlp_bias=True, tie_embeddings=True),
}

FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig))


def from_preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    import difflib
    close = difflib.get_close_matches(name, PRESETS, n=3)
    raise ValueError(f"Unknown model preset {name!r}. Known presets: {', '.join(PRESETS)}"
                     + (f". Did you mean {' or '.join(map(repr, close))}?" if close else ""))
  unknown = set(overrides) - set(FIELDS)
  if unknown:
    raise ValueError(f"Unknown model fields {sorted(unknown)}; valid fields: {', '.join(FIELDS)}")
  return PRESETS[name].replace(**overrides)
