"""Decoder-LLM classifiers (Llama, GPT-2 shapes): padding with the eos token, last-token pooling, the `score` head
under the head policy, target presets on their layer names; tiny random models built in-process."""

import json
from pathlib import Path

import pytest
import torch

from peftbench import methods
from peftbench.cli import main
from peftbench.models import build_classifier, load_tokenizer
from peftbench.store import Store
from tests.conftest import tiny_vocab, write_study

D, FFN, LAYERS = 32, 64, 2


def save_tiny_decoder(folder: Path, arch: str) -> Path:
    """A 2-layer, 32-wide random decoder with a word-level tokenizer that, like Llama's and GPT-2's, has an
    end-of-sequence token and no padding token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    vocab = {**tiny_vocab(), "</s>": len(tiny_vocab())}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    eos = vocab["</s>"]
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=D, intermediate_size=FFN,
                                       num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos,
                                       pad_token_id=None))
    else:
        model = GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=D, n_inner=FFN, n_layer=LAYERS, n_head=2,
                                     n_positions=128, bos_token_id=eos, eos_token_id=eos))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_decoder(request, tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("decoders") / request.param, request.param), request.param


def test_missing_pad_token_becomes_eos_in_tokenizer_and_model(tiny_decoder):
    folder, _ = tiny_decoder
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == "</s>"
    model = build_classifier(str(folder), 2).model
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["good movie", "a really boring and dull film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # more than one text per batch: needs the padding token
        alone = model(**tokenizer(["good movie"], return_tensors="pt")).logits
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-5)  # the last real token is pooled


@pytest.mark.parametrize("preset", ["auto", "all-linear", "attention", "mlp"])
def test_presets_resolve_on_decoder_names_and_score_is_the_head(tiny_decoder, preset):
    folder, arch = tiny_decoder
    expected = {
        "llama": {"auto": ["q_proj", "v_proj"], "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"],
                  "attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]},
        "gpt2": {"auto": ["c_attn"], "all-linear": ["c_attn", "c_proj", "c_fc"], "attention": ["c_attn", "attn.c_proj"],
                 "mlp": ["c_fc", "mlp.c_proj"]},
    }[arch][preset]
    backbone = build_classifier(str(folder), 2)
    spec = methods.METHODS["lora"]
    params = spec.finalize(spec.resolve_defaults({"r": 2, "target_modules": preset, "head": "classifier"}))
    resolved = methods.resolved_names("lora", backbone, params)
    assert resolved == {"head": ["score"], "target_modules": expected}
    model = methods.prepare("lora", backbone, params)
    counts = methods.count_parameters(model, resolved["head"])
    assert counts["head"] == D * 2  # score: a linear layer without bias
    assert counts["trainable"] == counts["adapter"] + counts["head"] and counts["adapter"] > 0


@pytest.mark.parametrize("arms", ['[[arms]]\nmethod = "lora"\nr = 4\nlr = 1e-2\ntarget_modules = "all-linear"\n',
                                  '[[arms]]\nmethod = "frozen"\nlr = 1e-2\n'])
def test_decoder_classifier_trains_with_batches_of_several_texts(tmp_path, tiny_decoder, tiny_data, arms):
    folder, _ = tiny_decoder
    study = write_study(tmp_path / "study.toml", folder, tiny_data, arms.replace("]]\n", "]]\nepochs = 1\n", 1))
    assert main(["run", str(study), "--store", str(tmp_path / "st"), "--no-report"]) == 0
    (run_id,) = Store(tmp_path / "st").run_ids()
    result = json.loads((tmp_path / "st" / run_id / "result.json").read_text())
    assert result["status"] == "success", result["error"]
    assert result["resolved"]["head"] == ["score"] and result["params"]["head"] == D * 2
