"""Tiny versions of the embedded experiments, for integration tests (seconds per stage on 2 cores)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner
from conftest import REPO

TINY = {
    "teacher": {"steps": 6, "batch_size": 16, "log_every": 2, "checkpoint_every": 3, "warmup_steps": 2,
                "sampler": {"num_steps": 3}},
    "distill": {"steps": 6, "batch_size": 8, "dfake_gen_update_ratio": 2, "warmup_steps": 2, "log_every": 1,
                "checkpoint_every": 3},
    "eval": {"num_samples": 40, "batch_size": 20, "teacher_steps": [1, 3], "grid_per_class": 2, "latency_repeats": 2,
             "classifier": {"width": 8, "feature_dim": 16, "steps": 10, "batch_size": 32}},
}

# Regression pre-training at tiny size (an override: `regression=TINY_REGRESSION`): 12 teacher pairs in 3 batches of 4
# (dealt to 2 ranks: 2 and 1), then 4 LPIPS steps (the recipe's VGG with average pooling, on a random backbone) at a
# learning rate that moves the weights.
TINY_REGRESSION = {"enabled": True, "num_pairs": 12, "pair_batch_size": 4, "teacher_steps": 2, "steps": 4,
                   "batch_size": 8, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "keep_last": 5,
                   "lpips": {"net": "vgg", "replace_pooling": True, "pretrained_backbone": False}}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_block(experiment: str) -> dict:
    """What shrinks an embedded experiment's block to the tiny size (by its teacher family)."""
    if experiment in ("mnist-ddpm", "mnist-flow"):  # a diffusers UNet
        unet = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
                "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 4}
    else:
        unet = {"channels": 8, "channel_mult": [1, 2]}
    return merge(TINY, {"teacher": {"unet": unet}})


def write_tiny_params(directory: Path, experiment: str = "mnist", **overrides: dict) -> Path:
    """The repository's params.yaml with every embedded experiment's block shrunk, `experiment:` set, and any stage
    overrides merged into that experiment's block."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in ("mnist", "mnist-ddpm", "mnist-flow"):
        params[name] = merge(params[name], tiny_block(name))
        params[name]["launch"]["main_process_port"] = worker_port()
    params["experiment"] = experiment
    params[experiment] = merge(params[experiment], overrides)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def worker_port(offset: int = 0) -> int:
    """A TCP port of this test process's own: pytest-xdist runs the suite in several worker processes at once (gw0,
    gw1, …), and two of them rendezvousing 2-process runs on one port would meet each other (or fail to bind).
    gw0 (and a run without xdist) gets 29500 + offset, gw1 29600 + offset, … write_tiny_params makes it the tiny
    experiments' launch.main_process_port, to which Slurm jobs add their job id (a test cluster runs far fewer
    than 100 jobs)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 29500 + 100 * int(worker.removeprefix("gw")) + offset


def run(root: Path, *args: str) -> None:
    """A `dmd2` stage in-process, on the project in `root`."""
    from dmd2.cli import main

    result = CliRunner().invoke(main, [*args, "--params", str(root / "params.yaml"), "--root", str(root)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


def start_stage(root: Path, stage: str) -> subprocess.Popen:
    """`dmd2 <stage>` on the project in `root` as its own process, on one thread (runs compared bit for bit must
    do the same arithmetic)."""
    return subprocess.Popen([sys.executable, "-m", "dmd2.cli", stage, "--params", str(root / "params.yaml"),
                             "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop_mid_run(root: Path, stage: str, log_glob: str, after_lines: int = 3) -> int:
    """Start `dmd2 <stage>`, send it SIGUSR1 once its training log (`log_glob` under root) has `after_lines`
    records, check that it stops as promised (exit status 75, one `stopped:` line) and return the iteration."""
    proc, deadline = start_stage(root, stage), time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        logs = list(root.glob(log_glob))
        if logs and len(logs[0].read_text().splitlines()) >= after_lines:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    found = re.search(r"stopped: SIGUSR1 at iteration (\d+): checkpoint (\S+) written", err)
    assert found, err[-3000:]
    return int(found.group(1))


def fresh_copy(prepared: Path, dest: Path, **overrides: dict) -> Path:
    """A new project with the prepared data and teacher, and tiny params with `overrides`."""
    for name in ("data", "models"):
        shutil.copytree(prepared / name, dest / name, ignore=shutil.ignore_patterns("student"))
    write_tiny_params(dest, **overrides)
    return dest


def run_dir(root: Path, stage: str) -> Path:
    """The (single) run directory a training stage made under work/mnist/<stage>/."""
    runs = sorted((root / "work/mnist" / stage).glob("run-*"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no run directory under {root / 'work/mnist' / stage}"
    return runs[-1]


# EDM's released-checkpoint path at tiny size: a CIFAR-10 archive and an ImageNet-style dataset_tool zip written in
# the official formats, and EDM-style pickles of tiny DDPM++ and ADM networks (tests/edm_fixtures.py).
EDM_TINY_NETWORKS = {
    "cifar10-tiny": {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
                     "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1],
                     "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16],
                     "augment_dim": 9, "dropout": 0.13, "use_fp16": False, "img_resolution": 32, "img_channels": 3,
                     "label_dim": 10},
    "imagenet64-tiny": {"model_type": "DhariwalUNet", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                        "attn_resolutions": [8], "dropout": 0.1, "use_fp16": True, "img_resolution": 16,
                        "img_channels": 3, "label_dim": 10},
}


def add_edm_experiments(root: Path) -> list[str]:
    """Write the tiny inputs under root/downloads and add `cifar10-tiny` and `imagenet64-tiny` to root/params.yaml."""
    from edm_fixtures import write_cifar10_archive, write_dataset_tool_zip, write_edm_checkpoint

    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    md5 = write_cifar10_archive(downloads / "cifar-10-binary.tar.gz")
    write_dataset_tool_zip(downloads / "imagenet-tiny.zip", 120, 16, 10)
    for name, constructor in EDM_TINY_NETWORKS.items():
        write_edm_checkpoint(downloads / f"{name}.pkl", constructor)
    params = yaml.safe_load((root / "params.yaml").read_text())
    teacher = {"family": "edm", "source": "edm_pickle", "sampler": {"num_steps": 3}}
    blocks = {
        "cifar10-tiny": {**params["mnist"], "data": {"source": "cifar10", "path": "downloads/cifar-10-binary.tar.gz",
                                                     "md5": md5, "resolution": 32},
                         "teacher": {**teacher, "pickle": "downloads/cifar10-tiny.pkl"}},
        "imagenet64-tiny": {**params["mnist"], "data": {"source": "image_folder", "path": "downloads/imagenet-tiny.zip",
                                                        "num_classes": 10, "resolution": 16},
                            "teacher": {**teacher, "pickle": "downloads/imagenet64-tiny.pkl"}},
    }
    params.update(blocks)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return list(blocks)
