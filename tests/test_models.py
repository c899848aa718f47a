"""Model loading, LoRA per architecture, adapters as arrays, logits at target positions only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedcollm.config import LoraConfig
from fedcollm.lm.encoding import collate, encode_pair
from fedcollm.lm.loading import ModelError, load_base_model, load_tokenizer, resolve_model
from fedcollm.lm.logits import HeadMismatchError, check_head, full_logits, target_logits
from fedcollm.lm.lora import get_adapter, lora_targets, save_adapter, set_adapter
from fedcollm.lm.models import load_with_lora
from tests.tiny import ARCHITECTURES, make_model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp(request.param), request.param)


def _perturb(arrays: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in arrays.items()}


def test_unknown_model_name_is_named_in_the_error() -> None:
    with pytest.raises(ModelError, match="no-such-model"):
        resolve_model("no-such-model")
    with pytest.raises(ModelError, match="smollm2-135m"):  # lists the aliases
        resolve_model("not_an_alias")


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing\.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model(str(tmp_path))


def test_hub_ids_pass_through_unchanged() -> None:
    assert resolve_model("openai-community/gpt2") == "openai-community/gpt2"


def test_lora_targets_default_per_architecture_and_override(tiny_arch: Path) -> None:
    model = load_base_model(str(tiny_arch))
    expected = {"gpt2": ["c_attn"]}.get(model.config.model_type, ["q_proj", "v_proj"])
    assert lora_targets(model, LoraConfig()) == expected
    assert lora_targets(model, LoraConfig(target_modules=["x"])) == ["x"]


def test_a_head_transform_fedcollm_does_not_know_is_refused_at_load(tiny_arch: Path) -> None:
    """`check_head` passes every architecture the shortcut reproduces and refuses the rest."""
    model = load_base_model(str(tiny_arch))  # check_head ran: this architecture passed
    own_forward = model.forward

    def scaled_forward(*args: object, **kwargs: object) -> object:
        out = own_forward(*args, **kwargs)
        out.logits = out.logits * 1.5  # an unknown post-head transform
        return out

    model.forward = scaled_forward  # type: ignore[method-assign]
    with pytest.raises(HeadMismatchError, match=model.config.model_type):
        check_head(model, "the-scaled-model")
    assert not model.training  # left in eval mode as it was


def test_target_logits_equal_the_models_own_logits(tiny_arch: Path) -> None:
    lm = load_with_lora(str(tiny_arch), LoraConfig(r=4, dropout=0.0), seed=0)
    set_adapter(lm.model, _perturb(get_adapter(lm.model)))
    items = [
        encode_pair(lm.tokenizer, "Question: Plants need?\nAnswer:", " light"),
        encode_pair(lm.tokenizer, "The sun is", " a star. Water boils"),
    ]
    batch = collate(items, lm.tokenizer.pad_token_id, device="cpu")
    ours = target_logits(lm.model, batch)
    reference = full_logits(lm.model, batch)
    assert ours.shape == (batch.num_targets, reference.shape[-1])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_adapter_round_trip_through_peft_format(tiny_llama: Path, tmp_path: Path) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=0)
    arrays = _perturb(get_adapter(lm.model))
    save_adapter(lm.model, tmp_path / "adapter", arrays)
    reloaded = PeftModel.from_pretrained(load_base_model(str(tiny_llama)), str(tmp_path / "adapter"))
    back = get_adapter(reloaded)
    assert list(back) == list(arrays)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])


def test_set_adapter_rejects_wrong_names_and_shapes(tiny_llama: Path) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=0)
    arrays = get_adapter(lm.model)
    name = next(iter(arrays))
    with pytest.raises(ValueError, match="shape"):
        set_adapter(lm.model, {**arrays, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        set_adapter(lm.model, {k: v for k, v in arrays.items() if k != name})


def test_lora_init_is_seeded(tiny_llama: Path) -> None:
    a = get_adapter(load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=3).model)
    b = get_adapter(load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=3).model)
    c = get_adapter(load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=4).model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_tokenizer_gets_a_pad_token(tiny_llama: Path) -> None:
    assert load_tokenizer(str(tiny_llama)).pad_token_id is not None


SAMPLE_TEXTS = [
    "Question: Which of these is a mammal?\nAnswer: the whale",
    " leading space,  double  spaces and a trailing one ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Ünïcödé: naïve café, 東京, Привет, emoji 🌍🚀",
    "numbers 3.14159 and 1,000,000; symbols <>{}[]#@~",
    "<bos>literal special tokens<eos> <start_of_turn>user hi<end_of_turn> <|im_start|>",
    "",
]


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_converted_tokenizer_behaves_like_autotokenizer(alias: str) -> None:
    """The fast path for converted GGUF folders must be the tokenizer AutoTokenizer would give."""
    from transformers import AutoTokenizer

    from fedcollm.lm.loading import needs_bos

    ours = load_tokenizer(alias)
    reference = AutoTokenizer.from_pretrained(resolve_model(alias))
    if reference.pad_token_id is None:
        reference.pad_token = reference.eos_token
    reference.padding_side = "right"
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids"):
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    assert len(ours) == len(reference) and ours.get_vocab() == reference.get_vocab()
    assert needs_bos(ours) == needs_bos(reference)
    assert ours.chat_template == reference.chat_template  # SmolLM2-Instruct's, kept from its GGUF
    for special in (True, False):
        for text in SAMPLE_TEXTS:
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == reference(text, add_special_tokens=special)["input_ids"], (special, text)
            for skip in (True, False):
                decoded = ours.decode(ids, skip_special_tokens=skip)
                assert decoded == reference.decode(ids, skip_special_tokens=skip), (skip, text)
    padded = ours(SAMPLE_TEXTS, padding=True)
    expected = reference(SAMPLE_TEXTS, padding=True)
    assert padded["input_ids"] == expected["input_ids"]
    assert padded["attention_mask"] == expected["attention_mask"]


def test_saved_adapter_config_does_not_depend_on_the_process_hash_seed(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Same adapter, same bytes: peft's target_modules set must not be written in hash order."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from fedcollm.config import LoraConfig; "
        "from fedcollm.lm.lora import save_adapter; from fedcollm.lm.models import load_with_lora; "
        "lm = load_with_lora(sys.argv[1], LoraConfig(r=4), seed=0); save_adapter(lm.model, Path(sys.argv[2]))"
    )
    saved = []
    for hash_seed in ("1", "3"):  # two seeds whose set order of {"q_proj", "v_proj"} differs
        folder = tmp_path / f"seed{hash_seed}"
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", script, str(tiny_llama), str(folder)], env=env, check=True)
        saved.append((folder / "adapter_config.json").read_bytes())
    assert saved[0] == saved[1]


def test_gguf_cache_key_follows_the_content_not_the_location(tmp_path: Path) -> None:
    """Two installs of the same model package share one converted folder; another file does not."""
    from fedcollm.lm.loading import _file_key

    content = np.random.default_rng(0).bytes(5 << 20)
    first, second, changed = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, data in ((first, content), (second, content), (changed, b"X" + content[1:])):
        path.parent.mkdir()
        path.write_bytes(data)
    assert _file_key(first) == _file_key(second)
    assert _file_key(first) != _file_key(changed)
