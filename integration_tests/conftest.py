"""Shared pytest setup: offline everywhere, seeded torch, the fixture tokenizer and the family sweep."""

import os
import pathlib
import sys

# Set before transformers / datasets / axolotl are imported anywhere: nothing may reach a model hub.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The models are tiny: one thread is fastest, and several oversubscribe a shared CI machine badly.
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_name, _value)

# `import fixtures` works from any test (the packages themselves come from the environment or PYTHONPATH).
_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures import FAMILIES, make_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
