"""Checkpoint loading: sharded and fused layouts, FP8 block dequantization, skipped extra layers, dummy
weights at a real config's shapes, and errors that name the file and tensor."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from model_test_utils import (
    HF_CASES,
    PagedRunner,
    assert_close_rel,
    build_hf_model,
    hf_logits,
    save_hf_case,
)
from safetensors.torch import load_file, save_file

from tpla_serve.forward_batch import ForwardMode
from tpla_serve.models import builtin_config, load_model
from tpla_serve.models.weight_utils import CheckpointTensorError

V3_CASE = "v3-qlora-noauxtc-norm-yarn-interleave"
V2_CASE = "v2-noqlora-greedy-yarn"


def _load(path: Path, **kwargs) -> torch.nn.Module:
    return load_model(path, dtype=torch.float32, show_progress=False, **kwargs)


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, param in pa.items():
        assert torch.equal(param, pb[name]), name


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A single-file checkpoint at dst with the given tensors and src's (or the given) config."""
    dst.mkdir()
    if config is None:
        shutil.copy(src / "config.json", dst / "config.json")
    else:
        (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def v3(hf_checkpoints) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    directory = hf_checkpoints[V3_CASE][0]
    return directory, _load(directory), load_file(directory / "model.safetensors")


def test_sharded_checkpoint_with_index(tmp_path: Path, v3) -> None:
    single = v3[1]
    save_hf_case(V3_CASE, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    _assert_same_params(_load(tmp_path), single)


def test_fused_expert_layout_of_transformers_5(tmp_path: Path, hf_checkpoints, v3) -> None:
    """transformers 5 keeps experts fused in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    directory, hf_model = hf_checkpoints[V3_CASE]
    state = hf_model.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    _assert_same_params(_load(_rewrite(directory, tmp_path / "fused", state)), v3[1])


def _quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    bn, bk = block
    scales = torch.empty(-(-rows // bn), -(-cols // bk))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            scales[i, j] = tile.abs().max() / 448.0
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (tile / scales[i, j]).to(torch.float8_e4m3fn)
    return q, scales


def _dequantize_reference(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = q.float()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scales[i, j]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_quantized_checkpoint(tmp_path: Path, v3, dtype: torch.dtype) -> None:
    """Projections stored as e4m3 + weight_scale_inv per [16, 12] block (dims not multiples of the block)
    load as exactly the reference dequantization, rounded once to the target dtype."""
    directory, _, tensors = v3
    block = (16, 12)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name.endswith(("proj.weight", "proj_with_mqa.weight")):
            q, s = _quantize_fp8(w, block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = _dequantize_reference(q, s, block)
        else:
            quantized[name] = dequantized[name] = w
    assert sum(v.dtype == torch.float8_e4m3fn for v in quantized.values()) > 30
    fp8 = load_model(
        _rewrite(directory, tmp_path / "fp8", quantized, config), dtype=dtype, show_progress=False
    )
    reference = load_model(
        _rewrite(directory, tmp_path / "ref", dequantized), dtype=dtype, show_progress=False
    )
    _assert_same_params(fp8, reference)


def test_extra_layers_are_skipped_with_a_log_line(tmp_path: Path, v3, caplog) -> None:
    """DeepSeek-V3 ships its multi-token-prediction module as layer num_hidden_layers (61)."""
    directory, model, tensors = v3
    n = model.config.num_hidden_layers
    extra = {
        k.replace(f"layers.{n - 1}.", f"layers.{n}."): v
        for k, v in tensors.items()
        if f"layers.{n - 1}." in k
    }
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    with caplog.at_level(logging.INFO, logger="tpla_serve.models.deepseek"):
        loaded = _load(_rewrite(directory, tmp_path / "mtp", tensors | extra))
    assert f"skipped checkpoint layers [{n}]" in caplog.text
    _assert_same_params(loaded, model)


def test_tied_word_embeddings(tmp_path: Path) -> None:
    arch, overrides = HF_CASES[V2_CASE]
    hf_model = build_hf_model(arch, overrides | {"tie_word_embeddings": True})
    hf_model.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    tokens = list(range(0, 120, 3))
    runner = PagedRunner(ours, page_size=4, max_tokens=len(tokens))
    (logits,) = runner.step(ForwardMode.EXTEND, [(runner.add(tokens), len(tokens))])
    assert_close_rel(logits, hf_logits(hf_model, tokens), "tied embeddings")


def test_dummy_weights_at_deepseek_v2_lite_shapes() -> None:
    model = load_model(
        builtin_config("deepseek-v2-lite"),
        dtype=torch.bfloat16,
        load_format="dummy",
        config_overrides={"num_hidden_layers": 2},
        show_progress=False,
    )
    cfg = model.config
    assert type(model.model.layers[1].mlp).__name__ == "DeepseekMoE"
    assert model.model.layers[1].mlp.experts.w13.shape == (64, 2 * 1408, 2048)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (16 * 192, 2048)
    assert model.model.layers[0].self_attn.w_uk.shape == (16, 128, 512)
    assert torch.all(model.model.norm.weight == 1)
    assert model.model.embed_tokens.weight.float().std().item() == pytest.approx(
        cfg.initializer_range, rel=0.01
    )
    runner = PagedRunner(model, page_size=16, max_tokens=32)
    request = runner.add(list(range(1, 21)))
    (prefill,) = runner.step(ForwardMode.EXTEND, [(request, 19)])
    (decode,) = runner.step(ForwardMode.DECODE, [(request, 1)])
    assert prefill.shape == (19, 102400) and decode.shape == (1, 102400) and decode.dtype == torch.float32
    assert torch.isfinite(prefill).all() and torch.isfinite(decode).all()


def test_dummy_weights_are_seeded(tmp_path: Path, hf_checkpoints) -> None:
    directory, _ = hf_checkpoints[V3_CASE]
    shutil.copy(directory / "config.json", tmp_path / "config.json")  # no safetensors needed
    a, b, c = (_load(tmp_path, load_format="dummy", seed=s) for s in (0, 0, 1))
    _assert_same_params(a, b)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    gate = a.model.layers[1].mlp.gate
    assert torch.all(gate.e_score_correction_bias == 0) and gate.weight.dtype == torch.float32


# --- errors ------------------------------------------------------------------------------------------


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no config.json in model directory {tmp_path}"):
        _load(tmp_path)


def test_no_safetensors_files(tmp_path: Path, v3) -> None:
    shutil.copy(v3[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no \\*.safetensors files in {tmp_path}"):
        _load(tmp_path)


def test_unknown_architecture(tmp_path: Path, v3) -> None:
    config = json.loads((v3[0] / "config.json").read_text()) | {"architectures": ["MixtralForCausalLM"]}
    _rewrite(v3[0], tmp_path / "ckpt", v3[2], config)
    with pytest.raises(ValueError, match=r"ckpt/config\.json: unknown architecture 'MixtralForCausalLM'"):
        _load(tmp_path / "ckpt")


def test_missing_tensor_is_named(tmp_path: Path, v3) -> None:
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    tensors = {k: v for k, v in v3[2].items() if k != name}
    with pytest.raises(ValueError, match=f"lacks tensor '{name}'"):
        _load(_rewrite(v3[0], tmp_path / "ckpt", tensors))


def test_missing_expert_is_named(tmp_path: Path, v3) -> None:
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    tensors = {k: v for k, v in v3[2].items() if k != name}
    with pytest.raises(ValueError, match=f"lacks tensor '{name}'"):
        _load(_rewrite(v3[0], tmp_path / "ckpt", tensors))


def test_misshaped_tensor_names_tensor_and_file(tmp_path: Path, v3) -> None:
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    tensors = v3[2] | {name: torch.zeros(64, 31)}
    with pytest.raises(
        CheckpointTensorError,
        match=rf"'{name}': shape \[64, 31\] does not match the expected \[128, 32\] \(in .*\.safetensors\)",
    ):
        _load(_rewrite(v3[0], tmp_path / "ckpt", tensors))


def test_unexpected_tensor_names_tensor_and_file(tmp_path: Path, v3) -> None:
    name = "model.layers.0.self_attn.rotary_scale"
    tensors = v3[2] | {name: torch.zeros(3)}
    with pytest.raises(
        CheckpointTensorError, match=rf"'{name}': the model has no such parameter \(in .*model\.safetensors\)"
    ):
        _load(_rewrite(v3[0], tmp_path / "ckpt", tensors))


def test_routed_expert_in_a_dense_layer(tmp_path: Path, v3) -> None:
    tensors = v3[2] | {"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(CheckpointTensorError, match="layer 0 is a dense layer"):
        _load(_rewrite(v3[0], tmp_path / "ckpt", tensors))


def test_index_naming_a_missing_shard(tmp_path: Path, v3) -> None:
    ckpt = _rewrite(v3[0], tmp_path / "ckpt", v3[2])
    weight_map = {name: "model.safetensors" for name in v3[2]} | {"lm_head.weight": "model-00002.safetensors"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002.safetensors"):
        _load(ckpt)


def test_fp8_weight_without_scale(tmp_path: Path, v3) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors = v3[2] | {name: v3[2][name].to(torch.float8_e4m3fn)}
    with pytest.raises(
        CheckpointTensorError, match=f"'{name}': is FP8 but the checkpoint has no '{name}_scale_inv'"
    ):
        _load(_rewrite(v3[0], tmp_path / "ckpt", tensors))


def test_bad_load_format(v3) -> None:
    with pytest.raises(ValueError, match="load_format must be one of auto, safetensors, dummy, got 'pt'"):
        _load(v3[0], load_format="pt")
