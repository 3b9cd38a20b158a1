"""A tiny DeepSeek-V3 checkpoint whose tokenizer has DeepSeek's chat and tool tokens, and whose greedy output
is fixed: a model that reasons, then calls a tool, in DeepSeek's formats, end to end through the server.

The model's attention and MLP outputs are zero, so each position's hidden state is its own token's
embedding, and lm_head maps that embedding to one chosen successor token: greedy decoding from the chat
template's `<｜Assistant｜>` walks SUCCESSORS. transformers writes the checkpoint, as for every test model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import build_tokenizer, tiny_config

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
           "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
           "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
REASONING = "I should look the weather up."
ARGUMENTS = '{"city": "Paris"}'
# The output after the generation prompt: DeepSeek-R1's reasoning, then DeepSeek-V3's tool-call block.
SUCCESSORS = ["<｜Assistant｜>", "<think>", REASONING, "</think>", "<｜tool▁calls▁begin｜>",
              "<｜tool▁call▁begin｜>", "function", "<｜tool▁sep｜>", "get_weather", "\n```json\n", ARGUMENTS, "\n```",
              "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", EOS]


def write_deepseek_tool_model(directory: Path) -> Path:
    from transformers import DeepseekV3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.add_tokens([t for t in SUCCESSORS if t not in SPECIAL])
    tokenizer.bos_token, tokenizer.eos_token = BOS, EOS
    tokenizer.save_pretrained(directory)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SUCCESSORS]
    config = tiny_config("v3", len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                param.zero_()
        embed = model.model.embed_tokens.weight
        normed = embed / embed.pow(2).mean(-1, keepdim=True).add(config.rms_norm_eps).sqrt()
        head = torch.zeros_like(model.lm_head.weight)
        for token, successor in zip(ids, ids[1:]):
            head[successor] += 20.0 * normed[token] / normed[token].pow(2).sum()
        model.lm_head.weight.copy_(head)
        logits = model.lm_head(model.model.norm(embed[ids[:-1]]))
    assert logits.argmax(-1).tolist() == ids[1:], "the successor map is not what greedy decoding follows"
    model.save_pretrained(directory)
    return directory
