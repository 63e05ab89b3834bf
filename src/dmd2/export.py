"""`dmd2 export`: a text-to-image student as a diffusers pipeline directory, for people who never run dmd2.

The directory holds the teacher pipeline's own components (VAE, text encoders, tokenizers) with the student's UNet
and an `LCMScheduler` in place of the teacher's. LCM's step is the student's sampler: predict x0 at t, re-noise it
with fresh noise to the next timestep, return the last x0. Its default timesteps for N steps,
k·(1000/N) − 1 for k = N … 1 with `original_inference_steps` = N, are the student's [999] or [999, 749, 499, 249];
other timesteps (SDXL's one step at 399) are passed to the call. So

    pipe = DiffusionPipeline.from_pretrained("models/sd-tiny/student-pipeline")
    image = pipe(prompt, num_inference_steps=1, guidance_scale=0).images[0]

samples the student (guidance 0: the student is never guided), and from the same initial latents and generator it
makes the same images as `dmd2 generate`. A LoRA student's UNet is stored with its adapters fused in, and the
adapters alone as `pytorch_lora_weights.safetensors`, for `load_lora_weights` on the teacher's own pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dmd2.atomic import fresh_staging_dir, replace_directory
from dmd2.families import ModelError, load_model

MARKER = "dmd2_student.json"  # in every exported pipeline: how to call it, and proof that export wrote the folder


class ExportError(ModelError):
    """An output directory export may not write to (reported as one `error:` line)."""


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps `LCMScheduler` takes for `num_steps` steps when `original_inference_steps` = `num_steps`."""
    k = num_train_timesteps // num_steps
    return [k * i - 1 for i in range(num_steps, 0, -1)]


def student_scheduler_config(teacher_scheduler: dict[str, Any], timesteps: list[int]) -> dict[str, Any]:
    """An LCMScheduler config on the teacher's noise schedule whose default timesteps are the student's when they
    can be (evenly spaced from the top), else the nearest; `timesteps_to_pass` says what to give the call."""
    from diffusers import LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr")
    config = {k: v for k, v in teacher_scheduler.items() if k in keep}
    scheduler = LCMScheduler(**config, original_inference_steps=len(timesteps), clip_sample=False,
                             set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)  # unused by LCM; 1 keeps SD pipelines from warning
    return dict(scheduler.config)


def export_pipeline(student_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the student at `student_dir` (a text-to-image student, normalised format) as a diffusers pipeline
    directory in `out_dir`, atomically; returns `out_dir`."""
    from diffusers import DiffusionPipeline, LCMScheduler

    out_dir = writable_export_dir(out_dir)
    student = load_model(student_dir)
    if not student.is_student or student.family.name != "stable_diffusion":
        raise ModelError(f"{student_dir} is not a text-to-image student (family {student.family.name}, "
                         f"kind {student.config['kind']}): only Stable Diffusion students export as diffusers pipelines")
    timesteps = student.timesteps
    scheduler = LCMScheduler.from_config(student_scheduler_config(student.config["scheduler"], timesteps))
    pipeline = DiffusionPipeline.from_pretrained(student.family.pipeline_path, unet=student.net, scheduler=scheduler)
    tmp = fresh_staging_dir(out_dir, create=False)
    pipeline.save_pretrained(tmp)
    lora = student.config["generator"].get("lora")
    if lora:  # the adapters alone too, for `load_lora_weights` on a copy of the teacher pipeline
        from safetensors.torch import load_file

        from dmd2.families.stable_diffusion import lora_config, save_lora_state

        adapter = load_file(Path(student_dir) / lora["file"])
        save_lora_state(student.family.pipeline_path, adapter, lora_config(lora["rank"], lora["alpha"]), tmp)
    default = lcm_timesteps(len(timesteps), student.family.num_train_timesteps)
    usage = {"num_inference_steps": len(timesteps), "guidance_scale": 0.0}
    if default != timesteps:
        usage["timesteps"] = timesteps  # not LCM's default for this step count: pass them to the call
    (tmp / MARKER).write_text(json.dumps(
        {"timesteps": timesteps, "call": usage, "teacher_pipeline": str(student.family.pipeline_path),
         "source": student.config.get("source")}, indent=2))
    replace_directory(tmp, out_dir)
    return out_dir


def writable_export_dir(out_dir: str | Path) -> Path:
    """`out_dir` as an absolute path, if an export may write there: it does not exist, is empty, or holds an
    earlier export (its MARKER file). Anything else is refused before any work: export replaces the whole
    directory, and a directory it did not write (a project root, `models/<exp>`) must never be deleted."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--output_dir {out_dir} is a file: name a new directory for the pipeline")
    if out_dir.is_dir() and os.path.ismount(out_dir):
        raise ExportError(f"--output_dir {out_dir} is a mount point, which cannot be replaced: name a new "
                          "directory inside it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise ExportError(f"--output_dir {out_dir} is not empty and was not written by `dmd2 export` (no {MARKER}): "
                          "export replaces the whole directory, so name a new or empty directory")
    return out_dir


def student_call_arguments(pipeline_dir: str | Path) -> dict[str, Any]:
    """The keyword arguments that sample an exported student as trained (`num_inference_steps`, `guidance_scale`,
    and `timesteps` where LCM's default differs)."""
    return json.loads((Path(pipeline_dir) / MARKER).read_text())["call"]
