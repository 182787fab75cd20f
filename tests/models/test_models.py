import pytest
import torch

from loopserve.models import load_model, tiny_tokenizer
from tests.conftest import TINY


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_gqa_and_deterministic(name):
    a, b = load_model(name), load_model(name)
    cfg = a.model.config
    assert cfg.num_attention_heads > cfg.num_key_value_heads
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits)


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    text = "héllo wörld ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")


def test_bfloat16_dtype():
    m = load_model("tiny-llama", dtype="bfloat16")
    assert next(m.model.parameters()).dtype == torch.bfloat16


def test_unknown_model_and_dtype_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", dtype="float8")


def test_local_hf_folder_loads(tmp_path):
    m = load_model("tiny-qwen2")
    m.model.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(again.model(ids).logits, m.model(ids).logits)


def test_default_model_shape(default_model):
    cfg = default_model.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert default_model.max_context == 8192


def test_random_llama3_8b_has_the_published_shape():
    """The GPU benchmark's stand-in for Llama-3.1-8B (no hub): built on the meta device here,
    so only its shapes exist."""
    from loopserve.models.shaped import shaped_model

    model = shaped_model("random-llama3-8b", torch.bfloat16, torch.device("meta"))
    params = sum(p.numel() for p in model.parameters())
    assert 8.02e9 < params < 8.04e9  # Llama-3.1-8B: 8.03B parameters
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 32, 8, 128)
