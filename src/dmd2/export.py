"""`dmd2 export`: a student in its ecosystem's own format (a text-to-image student as a diffusers pipeline
directory), for people who never run dmd2. The family writes it (`Family.export_student`); this module owns the
output directory and its marker file, which says how to call the export.

For Stable Diffusion students the directory holds the teacher pipeline's own components (VAE, text encoders, tokenizers) with the student's UNet
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


def export_pipeline(student_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the student at `student_dir` (normalised format) in its family's own format (`Family.export_student`:
    a diffusers pipeline for text-to-image students) into `out_dir`, atomically; returns `out_dir`."""
    out_dir = writable_export_dir(out_dir)
    student = load_model(student_dir)
    if not student.is_student or not student.family.exports_pipeline:
        raise ModelError(f"{student_dir} is not a student with an export format (family {student.family.name}, "
                         f"kind {student.config['kind']}): only text-to-image students export as diffusers pipelines")
    tmp = fresh_staging_dir(out_dir, create=False)
    call = student.family.export_student(student, Path(student_dir), tmp)
    (tmp / MARKER).write_text(json.dumps({"timesteps": student.timesteps, **call,
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
