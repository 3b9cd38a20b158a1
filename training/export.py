"""Saving a trained model in Hugging Face format, with its tokenizer and a model card.

Weights are stored in bf16 except each router's e_score_correction_bias, kept in fp32 as DeepSeek-V3's own
checkpoints keep it (its small updates vanish in bf16). transformers writes the routed experts in the
per-expert layout (`mlp.experts.{i}.{gate,up,down}_proj.weight`), which every DeepSeek loader reads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DeepseekV3ForCausalLM, GenerationConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def count_parameters(model: DeepseekV3ForCausalLM) -> tuple[int, int]:
    """(total, activated per token): activated counts only the top-k routed experts of each MoE layer."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - idle


def save_model(model: DeepseekV3ForCausalLM, out_dir: Path) -> None:
    """Write config.json, generation_config.json and model.safetensors (bf16, router bias fp32)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, DeepseekV3TopkRouter):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    cfg = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(str(out_dir))


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files byte for byte, so a draft's tokenizer is provably the target's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src_dir / name, out_dir / name)


@dataclass(frozen=True)
class ModelCard:
    name: str
    role: str
    total_params: int
    activated_params: int
    config_summary: dict[str, object]
    python_version: str
    train_files: int
    train_tokens: int
    held_out_files: int
    held_out_tokens: int
    held_out_fraction: float
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    seed: int
    device_name: str
    train_seconds: float
    final_train_loss: float
    held_out_nll: float
    held_out_perplexity: float
    held_out_accuracy: float
    command: str
    sample_prompt: str
    sample_completion: str

    def render(self) -> str:
        tokens_seen = self.steps * self.batch_size * self.seq_len
        shape = json.dumps(self.config_summary, indent=2)
        return f"""# {self.name}

A small {self.role} model of the DeepSeek-V3 architecture (`DeepseekV3ForCausalLM`), trained from scratch by
tpla-serve's own training script. It writes Python-like code and nothing else: it exists so that the serving
engine, TPLA accuracy and speculative decoding can be tested on a model that makes meaningful text.

## Size
- Parameters: {self.total_params:,} total, {self.activated_params:,} activated per token.
- Weights: bf16 (`model.safetensors`), router `e_score_correction_bias` in fp32.
- Shape (MLA with q_lora, latent KV, decoupled RoPE; dense first layers then MoE with sigmoid scoring,
  group-limited top-k routing and a shared expert):

```json
{shape}
```

## Data
- The `.py` files of the Python {self.python_version} standard library (installed packages excluded, files
  over 512 KiB and non-UTF-8 files skipped), each framed as `<|bos|>` text `<|eos|>`.
- Held-out split by file: a file is held out when the SHA-256 of its relative path falls in the lowest
  {self.held_out_fraction:.0%} of the hash range.
- Training: {self.train_files} files, {self.train_tokens:,} tokens. Held-out: {self.held_out_files} files,
  {self.held_out_tokens:,} tokens.
- Tokenizer: byte-level BPE (`tokenizers`), {self.config_summary.get("vocab_size")} entries, trained on the
  training split; special tokens `<|bos|>`, `<|eos|>`, `<|pad|>`. The chat template renders turns as
  `# role:` comment lines.

## Training
- {self.steps} steps of AdamW (betas 0.9/0.95, weight decay 0.1, peak lr {self.lr:g}, linear warm-up then
  cosine decay to 10%), batch {self.batch_size} x {self.seq_len} tokens ({tokens_seen:,} tokens seen), bf16
  autocast where a GPU is used, auxiliary-loss-free expert balancing (router bias updates), seed {self.seed}.
- Device: {self.device_name}; training took {self.train_seconds:.0f} s.
- Final training loss (mean of the last logging interval): {self.final_train_loss:.3f}.

## Held-out evaluation
| tokens | mean NLL | perplexity | next-token accuracy |
|---|---|---|---|
| {self.held_out_tokens:,} | {self.held_out_nll:.3f} | {self.held_out_perplexity:.2f} | {self.held_out_accuracy:.1%} |

Greedy continuation of `{self.sample_prompt}`:

```python
{self.sample_prompt}{self.sample_completion}
```

## Reproduce
```
{self.command}
```

License: Apache-2.0 (the weights); the training data is the Python standard library (PSF License).
"""


def write_card(card: ModelCard, out_dir: Path) -> None:
    (out_dir / "README.md").write_text(card.render(), encoding="utf-8")
