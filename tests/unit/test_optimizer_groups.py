"""Weight decay follows transformers' Trainer (and so TRL): none on biases and normalisation weights."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ppoflow.backends import decay_parameter_groups


def names(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_llama_norms_are_not_decayed():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    decay, no_decay = decay_parameter_groups([model], 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert names(model, no_decay) == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    }
    assert "model.layers.0.self_attn.q_proj.weight" in names(model, decay)
    assert "lm_head.weight" in names(model, decay) or model.config.tie_word_embeddings


def test_gpt2_biases_and_layer_norms_are_not_decayed():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    decay, no_decay = decay_parameter_groups([model], 0.01)
    exempt = names(model, no_decay)
    assert {
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.ln_f.weight",
    } <= exempt
    assert all(name.endswith("bias") or ".ln_" in name for name in exempt), exempt
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"} <= names(model, decay)


def test_frozen_parameters_are_left_out_and_models_are_combined():
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    policy.model.embed_tokens.requires_grad_(False)
    other = torch.nn.Linear(4, 4)
    decay, no_decay = decay_parameter_groups([policy, other], 0.1)
    everything = {id(p) for p in decay["params"] + no_decay["params"]}
    assert id(policy.model.embed_tokens.weight) not in everything
    assert id(other.weight) in {id(p) for p in decay["params"]} and id(other.bias) in {
        id(p) for p in no_decay["params"]
    }
