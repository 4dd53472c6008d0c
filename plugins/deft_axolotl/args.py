"""The `deft:` block of an Axolotl config.

    plugins:
      - deft_axolotl.DeftPlugin
    deft:
      coef: 1.0
      capture: act

The block's keys are the fields of `deft_common.DeftConfig` (read from the dataclass, so a new field appears
here by itself, described by its `help`) plus `enabled`. Pydantic coerces YAML values to the field types (PyYAML reads `1e-7` as a
string); DeftConfig itself checks the values, so every adapter rejects the same settings with the same message.
Unknown keys are an error: Axolotl's own schema silently drops keys it does not know.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from deft_common import DeftConfig, DeftConfigError

BLOCK_KEYS = ("enabled", *DeftConfig.field_names())


class _DeftBlockBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise DeftConfigError(
                f"`deft:` must be a block of settings such as `deft: {{coef: 1.0}}`, got {data!r}; "
                f"the settings are {list(BLOCK_KEYS)}"
            )
        unknown = sorted(set(data) - set(BLOCK_KEYS))
        if unknown:
            raise DeftConfigError(
                f"unknown key(s) {unknown} in the `deft:` block; the known keys are {list(BLOCK_KEYS)}"
            )
        return data

    @model_validator(mode="after")
    def _valid_deft_config(self):
        self.to_deft_config()  # DeftConfig raises DeftConfigError (a ValueError) naming the field and the fix
        return self

    def to_deft_config(self) -> DeftConfig:
        return DeftConfig.from_dict({name: getattr(self, name) for name in DeftConfig.field_names()})


def _deft_fields() -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(DeftConfig)
    fields = {}
    for field in dataclasses.fields(DeftConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        fields[field.name] = (hints.get(field.name, Any), Field(default=default, description=DeftConfig.help(field.name)))
    return fields


DeftBlock = create_model(
    "DeftBlock",
    __base__=_DeftBlockBase,
    __doc__="Settings of the DEFT density loss (the fields of deft_common.DeftConfig) plus `enabled`.",
    enabled=(bool, Field(default=True, description="false keeps the plugin listed but trains without DEFT")),
    **_deft_fields(),
)

# Axolotl configs that pick a trainer DEFT cannot wrap: it would not see the task loss it must add to.
UNSUPPORTED = {
    "rl": "preference / RL training (DPO, KTO, ORPO via rl:, GRPO, ...)",
    "reward_model": "reward-model training",
    "process_reward_model": "process-reward-model training",
}


class DeftArgs(BaseModel):
    """Input arguments Axolotl merges into its config schema when `deft_axolotl.DeftPlugin` is listed."""

    deft: DeftBlock = Field(  # type: ignore[valid-type]
        default_factory=DeftBlock,
        description="DEFT density loss; keys: " + ", ".join(BLOCK_KEYS),
    )

    @field_validator("deft", mode="before")
    @classmethod
    def _empty_block_means_defaults(cls, value: Any) -> Any:
        return {} if value is None else value  # a bare `deft:` line

    @model_validator(mode="before")
    @classmethod
    def _supported_setup(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        block = data.get("deft")
        if isinstance(block, dict) and block.get("enabled") is False:
            return data
        for key, what in UNSUPPORTED.items():
            if data.get(key):
                raise DeftConfigError(
                    f"DEFT does not support {what} (`{key}: {data[key]}`); remove `deft_axolotl.DeftPlugin` "
                    "from `plugins:` or set `deft: {enabled: false}`"
                )
        if data.get("gradient_checkpointing") in ("offload", "offload_disk"):
            raise DeftConfigError(
                f"`gradient_checkpointing: {data['gradient_checkpointing']}` runs each layer's forward without "
                "gradients (reentrant offloading), so the DEFT density loss would train nothing; use "
                "`gradient_checkpointing: true` (DEFT makes it non-reentrant)"
            )
        return data
