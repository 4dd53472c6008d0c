"""Installing: the package declares the torch versions it supports as a range that includes the one the tests pin
(tox.ini, exactly), and `import deft_axolotl` without axolotl says what to install."""

from __future__ import annotations

import configparser
import pathlib
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version
from processes import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
AXOLOTL_INSTALL = "pip install 'deft-plugins[axolotl]'"
AXOLOTL_INSTALL_FROM_CHECKOUT = "pip install '.[axolotl]'"


def torch_requirement(requirements: list[str]) -> Requirement:
    found = [Requirement(r) for r in requirements if Requirement(r).name == "torch"]
    assert len(found) == 1, requirements
    return found[0]


def pinned_torch() -> Requirement:
    """The torch the test environments install first, from tox.ini's [testenv] deps."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    return torch_requirement(tox["testenv"]["deps"].split("\n"))


def test_tox_pins_torch_exactly():
    specifiers = list(pinned_torch().specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==" and "*" not in specifiers[0].version, specifiers
    assert Version(specifiers[0].version) == Version("2.13.0")


def test_the_package_declares_a_torch_range_that_includes_the_tested_one():
    """A plugin installs next to the torch the user's framework chose: a range with both bounds, no exact pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = torch_requirement(project["dependencies"])
    operators = {s.operator for s in torch.specifier}
    assert not operators & {"==", "===", "~="}, f"torch is pinned, not a range: {torch}"
    assert operators & {">=", ">"} and operators & {"<", "<="}, f"a range needs both bounds: {torch}"
    tested = next(iter(pinned_torch().specifier)).version
    # tox installs the tested torch first (a local CPU wheel, e.g. 2.13.0+cpu); the package install must keep it.
    for version in (tested, f"{tested}+cpu"):
        assert torch.specifier.contains(version), f"{torch} excludes the tested torch {version}"
    assert not torch.specifier.contains("2.5.1"), "transformers 5.x disables torch below 2.5/2.6"


HIDE_AXOLOTL = '''
import importlib.abc
import sys


class NoAxolotl(importlib.abc.MetaPathFinder):
    """axolotl as if not installed (where it is installed, too)."""

    def find_spec(self, name, path=None, target=None):
        if name == "axolotl" or name.startswith("axolotl."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoAxolotl())
try:
    import deft_axolotl
except ImportError as err:
    print(type(err).__name__)
    print(err)
    print(type(err.__cause__).__name__, getattr(err.__cause__, "name", None))
else:
    print("imported")
'''


def test_import_deft_axolotl_without_axolotl_says_what_to_install():
    done = subprocess.run([sys.executable, "-c", HIDE_AXOLOTL], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    kind, message, cause = done.stdout.splitlines()
    assert kind == "ImportError"  # not the raw ModuleNotFoundError of the first `from axolotl...` line
    assert "axolotl" in message and AXOLOTL_INSTALL in message and AXOLOTL_INSTALL_FROM_CHECKOUT in message
    assert cause == "ModuleNotFoundError axolotl"  # the original error, chained


def test_the_readme_says_how_to_install_for_axolotl():
    readme = (ROOT / "README.md").read_text()
    assert AXOLOTL_INSTALL in readme and AXOLOTL_INSTALL_FROM_CHECKOUT in readme
