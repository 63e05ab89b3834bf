"""Model families behind one interface (`Family`), and the normalised model format every stage reads.

A model directory holds `config.json` (`format`, `family`, `kind`: teacher or student, and the family's own
keys) and, unless the family records its weights by reference, `model.safetensors`. Teachers trained here,
converted or referenced, and students written by `distill`, all land in this format, so `distill`, `generate`
and `evaluate` never care where a model came from; `config.json`'s `family` picks the module that reads it.

Families are registered by name in `FAMILIES`, each as the place its class is defined, and imported only when a model
or an experiment of that family is used: a stage imports the one family its experiment names, and its code
dependencies (`dmd2.stage.stage_code`) are that family's files, so editing one family reruns no other's stages.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmd2.atomic import fresh_staging_dir, replace_directory
from dmd2.families.base import FORMAT, Family, ModelError, read_config

# name (config.json's and params.yaml's `family`) → "module:Class", imported on first use; a family defined
# elsewhere (a plugin, a test) is added with `register_family`
FAMILIES: dict[str, str | type[Family]] = {
    "edm": "dmd2.families.edm:EDMFamily",
    "diffusers": "dmd2.families.diffusers:DiffusersFamily",
    "stable_diffusion": "dmd2.families.stable_diffusion:StableDiffusionFamily",
    "flow": "dmd2.families.flow:FlowFamily",
    "flow_pipeline": "dmd2.families.flow_pipeline:FlowPipelineFamily",
}
DEFAULT_FAMILY = "edm"  # a `teacher:` block without `family:` (the teachers the pipeline trained before families)

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "FORMAT", "LORA_FILE", "Family", "Model", "ModelError", "family_class",
           "family_for", "family_module", "import_teacher", "load_model", "read_config", "register_family",
           "save_model", "student_config", "teacher_config"]


def register_family(name: str, family: str | type[Family]) -> None:
    """Make `family` (a `Family` subclass, or "module:Class") available as `family: <name>`."""
    FAMILIES[name] = family


def family_class(name: str) -> type[Family]:
    """The class of the family called `name`, its module imported now if it was not yet."""
    if name not in FAMILIES:
        raise ModelError(f"model family {name!r} is not known (known: {', '.join(FAMILIES)})")
    entry = FAMILIES[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = FAMILIES[name] = getattr(importlib.import_module(module), attribute)
    return entry


def family_module(name: str) -> str:
    """The module that defines the family called `name` (without importing it)."""
    entry = FAMILIES[name]
    return entry.partition(":")[0] if isinstance(entry, str) else entry.__module__


def family_for(config: dict[str, Any]) -> Family:
    """The family object for a model config (config.json's `family`)."""
    return family_class(config.get("family"))(config)


def teacher_config(teacher_cfg, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """config.json of a teacher described by params.yaml's `teacher:` block (trained here on data of
    `sample_shape` with `num_classes` classes, or recorded from a pretrained model)."""
    return family_class(teacher_cfg.family).teacher_config(teacher_cfg, sample_shape, num_classes)


def import_teacher(teacher_cfg, sample_shape: tuple[int, ...], num_classes: int,
                   root: Path) -> tuple[dict[str, Any], Any]:
    """A teacher from somewhere else (`teacher.source` other than train): its config.json and weights (None: by
    reference), checked against the experiment's data (`sample_shape`, `num_classes`)."""
    return family_class(teacher_cfg.family).import_teacher(teacher_cfg, sample_shape, num_classes, root)


LORA_FILE = "lora.safetensors"  # a LoRA student's adapters, beside its fused weights


def student_config(teacher: dict[str, Any], timesteps: list[int], source: dict[str, Any],
                   lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """A student's config.json: its teacher's architecture and family, its own weights, and the generator's
    timesteps (one step: [999]; four: [999, 749, 499, 249]); a LoRA generator's rank and alpha."""
    config = {k: v for k, v in teacher.items() if k not in ("pretrained", "source", "format")}
    generator = {"timesteps": list(timesteps), **({"lora": lora} if lora else {})}
    return {**config, "kind": "student", "generator": generator, "source": source}


@dataclass
class Model:
    """A loaded teacher or student: its network, its family and its config.json."""

    net: nn.Module
    family: Family
    config: dict[str, Any]

    @property
    def is_student(self) -> bool:
        return self.config["kind"] == "student"

    @property
    def timesteps(self) -> list[int]:
        """The generator's timesteps (students only)."""
        return list(self.config["generator"]["timesteps"])

    def steps(self, num_steps: int | None = None) -> int:
        """Sampling steps: a student's own count, or `num_steps` (default: the teacher's full sampler)."""
        return len(self.timesteps) if self.is_student else (num_steps or self.family.default_teacher_steps)

    def nfe(self, num_steps: int | None = None) -> int:
        return self.steps() if self.is_student else self.family.teacher_nfe(self.steps(num_steps))

    def describe(self, num_steps: int | None = None) -> str:
        """How it samples, for tables: '18 Heun steps', '50 DDIM steps', '1-step generator (t = 999)'."""
        if self.is_student:
            return f"{self.steps()}-step generator (t = {', '.join(map(str, self.timesteps))})"
        n = self.steps(num_steps)
        return f"{n} {self.family.sampler_name} step{'s' if n != 1 else ''}"


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: bool = True,
               data_dir: str | Path | None = None) -> Model:
    """A teacher or student directory → a frozen, eval-mode `Model` on `device`, its family reading the conditions
    that come from the experiment's data in `data_dir` (a text-to-image model's prompts). With `weights=False` the
    network is built on the meta device instead (shapes only, no memory): a skeleton to shard, then fill."""
    config = read_config(path)
    family = family_for(config)
    if data_dir is not None:
        family.use_data(Path(data_dir))
    if not weights:
        with torch.device("meta"):
            return Model(family.build_network().eval().requires_grad_(False), family, config)
    net = family.load_network(Path(path))
    return Model(net.to(device).eval().requires_grad_(False), family, config)


def save_model(out_dir: str | Path, weights: nn.Module | dict[str, torch.Tensor] | None, config: dict[str, Any],
               extra_files: dict[str, str] | None = None, extra_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json (+ the weights, unless None: a reference; + a LoRA student's adapters, `extra_weights`,
    as LORA_FILE) into `out_dir` atomically (a temp directory renamed over the old one)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = fresh_staging_dir(out_dir)
    if weights is not None:
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": FORMAT})
    if extra_weights is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra_weights.items()}, tmp / LORA_FILE,
                  metadata={"format": FORMAT})
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    replace_directory(tmp, out_dir)
