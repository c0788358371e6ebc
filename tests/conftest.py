"""Shared fixtures: the embedded tokenizer, tiny random Llama models, and stage-script arguments."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (chat template, pad = EOS); converted once into $OPPU_CACHE."""
    from oppu.modeling import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec())


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """Factory of a 2-layer random Llama on the embedded vocabulary: the same seed gives the same
    weights, so two calls give identical, independent base models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from oppu.modeling import prepare_model

    def make(seed: int = 0):
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            initializer_range=0.2,  # at the default 0.02 the tied logits span < 1 nat: nothing can be learnt
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.random.fork_rng():  # deterministic weights without touching the caller's RNG
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).float()
        # Set after construction, as load_model does: pad is EOS here, and a pad id in the config
        # would zero EOS's embedding row at init, so the tied head could never predict EOS.
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        prepare_model(model)  # as load_model does (2 key/value heads for 4 query heads: grouped on CPU)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def make_args():
    """Factory of OPPU.py's parsed arguments (LoRA r=8, alpha=8, dropout 0.05, ...); extra flags
    are appended to a minimal news_categorize command line."""
    import OPPU
    from oppu.defaults import resolve_training_defaults

    def make(*extra: str):
        args = OPPU.parse_args(["--task_lora", "unused", "--task_name", "news_categorize", *extra])
        resolve_training_defaults(args, "OPPU", parameters=None)  # unknown size: the paper's values
        return args

    return make
