"""Configuration: typed, validated, with errors that name the key, the expectation and the closest key."""

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO

from dmd2.cli import main
from dmd2.config import (
    ConfigError,
    DistillConfig,
    SlurmConfig,
    apply_override,
    load_params,
    parse_params,
    to_dict,
)


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.experiment == "mnist"
    assert params.current().distill.denoising_timesteps == [999]
    for name in params.experiments:  # every teacher block, read by its family's schema
        assert params.current(name).teacher.family


def test_no_recipe_uses_the_regression_term():
    """README and docs/differences.md say `distill.regression_weight` is 0 in every recipe (DMD2's choice)."""
    params = load_params(REPO / "params.yaml")
    assert {name: params.current(name).distill.regression_weight for name in params.experiments} == \
        {name: 0.0 for name in params.experiments}


def test_every_recipe_has_one_critic_and_one_step_per_batch():
    """docs/differences.md says `distill.step_per_sample` and `distill.critic_per_step` are off in every recipe."""
    params = load_params(REPO / "params.yaml")
    settings = {name: (params.current(name).distill.step_per_sample, params.current(name).distill.critic_per_step)
                for name in params.experiments}
    assert settings == {name: (False, False) for name in params.experiments}


def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_misspelt_key_names_path_and_closest_key():
    raw = raw_params()
    raw["mnist"]["distill"]["stpes"] = 10
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "mnist.distill.stpes" in message and "did you mean 'steps'" in message


def test_wrong_type_names_path_and_expectation():
    raw = raw_params()
    raw["mnist"]["teacher"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"mnist\.teacher\.lr: .*number"):
        parse_params(raw)


def test_unknown_top_level_key_and_missing_experiment_block():
    raw = raw_params()
    raw["wandbb"] = {}
    with pytest.raises(ConfigError, match="did you mean 'wandb'"):
        parse_params(raw)
    raw = raw_params()
    raw["experiment"] = "celeba"
    with pytest.raises(ConfigError, match="no block"):
        parse_params(raw)


def test_overrides_are_yaml_typed_and_relative_to_the_experiment():
    raw = raw_params()
    apply_override(raw, "distill.steps=7")
    apply_override(raw, "mnist.distill.denoising_timesteps=[999, 499]")
    apply_override(raw, "wandb.mode=offline")
    params = parse_params(raw)
    assert params.current().distill.steps == 7
    assert params.current().distill.denoising_timesteps == [999, 499]
    assert params.wandb.mode == "offline"


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="decreasing"):
        DistillConfig(denoising_timesteps=[249, 999])
    with pytest.raises(ValueError, match="min_step_percent"):
        DistillConfig(min_step_percent=0.9, max_step_percent=0.1)
    for key in ("critic_logit_normal", "dm_logit_normal"):
        with pytest.raises(ValueError, match=f"{key} is \\[mean, std\\].*std must be > 0"):
            DistillConfig(**{key: (0.0, 0.0)})  # a constant time, or (negative) a mirrored one: never meant
    with pytest.raises(ValueError, match=r"slurm.distill.runtime_minutes \(5\) must exceed slurm.stop_before_limit"):
        SlurmConfig(distill={"runtime_minutes": 5})  # every run of the job would stop after one iteration
    with pytest.raises(ValueError, match=r"gpus: 1 is not a setting of this job.*launch.gpus_per_machine GPUs"):
        SlurmConfig(regression={"gpus": 1})  # its GPUs follow launch:, as distill's


@pytest.mark.parametrize("key", ["teacher.lr", "distill.generator_lr", "distill.critic_lr", "eval.classifier.lr"])
@pytest.mark.parametrize("value", [".inf", ".nan", "2e3", "0"])
def test_every_learning_rate_must_be_finite_positive_and_at_most_one(key, value):
    raw = raw_params()
    apply_override(raw, f"{key}={value}")
    with pytest.raises(ConfigError, match=rf"mnist\.{key}: "):
        parse_params(raw)


def test_cli_exits_nonzero_with_the_message(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = CliRunner().invoke(main, ["prepare-data", "--params", str(tmp_path / "params.yaml"),
                                       "--set", "data.resolutoin=8"])
    assert result.exit_code == 2
    assert "mnist.data.resolutoin" in result.output and "did you mean 'resolution'" in result.output


def _help_lists(command: str) -> dict[str, list[str]]:
    """`dmd2 <command> --help`'s "block: key, key, ..." paragraphs, unwrapped, by block."""
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=60)
    assert result.exit_code == 0, result.output
    paragraphs = [" ".join(p.split()) for p in result.output.split("\n\n")]
    return {p.rsplit(": ", 1)[0]: p.rsplit(": ", 1)[1].split(", ") for p in paragraphs if ": " in p}


def _leaves(node: dict, prefix: str = "") -> list[str]:
    return [leaf for k, v in node.items()
            for leaf in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])]


def test_every_stage_help_lists_the_params_yaml_keys_it_reads():
    """`dmd2 <stage> --help` names each key of the blocks the stage reads, for every pipeline stage, and every key
    the default experiment sets in params.yaml is among its stage's (a key the help forgot would fail here)."""
    from dmd2.stage import STAGE_PARAMS

    mnist = yaml.safe_load((REPO / "params.yaml").read_text())["mnist"]
    for stage, blocks in STAGE_PARAMS.items():
        command = stage.replace("_", "-")
        assert command in main.commands, stage
        if blocks == ("",):
            assert "Reads the whole experiment block" in CliRunner().invoke(main, [command, "--help"]).output
            continue
        listed = _help_lists(command)
        for block in blocks:
            title = f"teacher.family: {mnist['teacher'].get('family', 'edm')}" if block == "teacher" else block
            node = mnist
            for part in block.split("."):
                node = node.get(part, {})
            assert set(_leaves(node)) <= set(listed[title]), (stage, title)
    nested = {"steps", "generator_lr", "gan.enabled", "gan.gen_weight", "lora.rank"}  # nested blocks, dotted
    assert nested <= set(_help_lists("distill")["distill"])


def test_relative_overrides_apply_to_the_experiment_selected_on_the_command_line():
    params = load_params(REPO / "params.yaml", ["distill.steps=7"], experiment="mnist-ddpm")
    assert params.current("mnist-ddpm").distill.steps == 7
    assert params.current("mnist").distill.steps != 7  # not the `experiment:` of params.yaml


def test_a_misspelt_config_file_key_names_that_file_and_the_closest_key(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for text, hint in [("stpes: 4\n", "did you mean 'steps'?"), ("distil: {steps: 4}\n", "did you mean 'distill'?")]:
        (tmp_path / "my.yaml").write_text(text)
        result = CliRunner().invoke(main, ["distill", "--params", str(tmp_path / "params.yaml"),
                                           "--config", str(tmp_path / "my.yaml")])
        assert result.exit_code == 2, result.output
        assert f"--config {tmp_path / 'my.yaml'}: unknown key" in result.output and hint in result.output


def test_a_config_file_may_hold_any_block(tmp_path):
    """`--config` takes the seed's flat distill keys and params.yaml's own blocks (launch:, wandb:, ...)."""
    from dmd2.cli import _config_file_overrides

    path = tmp_path / "my.yaml"
    path.write_text("steps: 4\ngan: {enabled: false}\nlaunch: {distributed: ddp, processes_per_machine: 2}\n"
                    "wandb: {project: p}\n")
    overrides = _config_file_overrides(str(path), "distill")
    params = load_params(REPO / "params.yaml", overrides)
    exp = params.current()
    assert exp.distill.steps == 4 and exp.distill.gan.enabled is False
    assert exp.launch.distributed == "ddp" and exp.launch.processes_per_machine == 2 and params.wandb.project == "p"


def test_malformed_override_values_and_names_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"not valid YAML.*quote strings"):
        load_params(REPO / "params.yaml", ["distill.denoising_timesteps=[999, 499"])
    with pytest.raises(ConfigError, match="not a dotted key path"):
        load_params(REPO / "params.yaml", ["distill..steps=3"])
    with pytest.raises(ConfigError, match="not allowed"):
        load_params(REPO / "params.yaml", experiment="a$(touch X)b")


def test_renamed_keys_say_what_they_became():
    raw = raw_params()
    raw["mnist"]["distill"]["guidance_lr"] = 1e-4
    with pytest.raises(ConfigError, match="guidance_lr: renamed to critic_lr"):
        parse_params(raw)


def test_yaml_booleans_that_mean_no_are_accepted():
    """DVC's `exp run -S` rewrites params.yaml as YAML 1.2, unquoting "no"; PyYAML then reads False."""
    raw = raw_params()
    raw["mnist"]["distill"]["mixed_precision"] = False
    raw["mnist"]["launch"]["distributed"] = False
    params = parse_params(raw)
    assert params.current().distill.mixed_precision == "no" and params.current().launch.distributed == "no"


def test_dvc_rewrites_params_yaml_by_changing_one_line_and_its_words_stay_words(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through DVC's own YAML round trip (modify_yaml): the file is already in
    the form it writes, so one value changes one line, and what it writes reads back the same."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    with modify_yaml(path) as data:
        data["mnist"]["distill"]["steps"] = 960
        data["wandb"]["project"] = "no"
    before, after = original.splitlines(), path.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == ["project: no", "steps: 960"]
    params = load_params(path)
    assert params.wandb.project == "no" and params.current().distill.steps == 960
    assert params.current().distill.mixed_precision == "no"  # written bare, read as False: still "no"


def test_the_teacher_block_is_a_union_picked_by_family():
    raw = raw_params()
    assert parse_params(raw).current("mnist-ddpm").teacher.family == "diffusers"
    # the block is recorded (stage.json, the tracker, Snakemake's settings stamps) as the family reads it: every key
    recorded = to_dict(parse_params(raw).current("mnist"))["teacher"]
    assert recorded["p_mean"] == -1.2 and recorded["sampler"]["rho"] == 7.0 and recorded["family"] == "edm"
    raw["mnist"]["teacher"]["family"] = "flux"
    with pytest.raises(ConfigError, match="mnist.teacher"):
        parse_params(raw)
    raw = raw_params()
    raw["mnist-ddpm"]["teacher"]["unet"]["block_out_chanels"] = [8]
    params = parse_params(raw)  # the family reads its own block when the experiment is used
    with pytest.raises(ConfigError, match=r"mnist-ddpm\.teacher\.unet\.block_out_chanels: unknown key; did you mean "
                                          r"'block_out_channels'"):
        params.current("mnist-ddpm")
    raw["experiment"] = "mnist-ddpm"
    with pytest.raises(ConfigError, match=r"mnist-ddpm\.teacher\.unet\.block_out_chanels"):
        parse_params(raw)  # the selected experiment's at once


def test_params_yaml_imports_only_the_family_of_the_experiment_used():
    """The CLI and every stage's module, and loading params.yaml (every family's experiments in it), import no
    family; using an experiment imports its family's module alone (a stage depends on that family's files only)."""
    import subprocess
    import sys

    stages = "cli, data, teacher, regression, distill, launch, fid, evaluate, report"
    code = (f"import sys; from dmd2 import {stages}; from dmd2.config import load_params; "
            "p = load_params(experiment='mnist-ddpm'); "
            "before = sorted(m for m in sys.modules if m.startswith('dmd2.families.')); p.current('mnist-ddpm'); "
            "print(before, sorted(m for m in sys.modules if m.startswith('dmd2.families.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['dmd2.families.base',", "'dmd2.families.diffusers']", "['dmd2.families.base',",
                           "'dmd2.families.diffusers']"], out


def test_teacher_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    import math

    import torch

    from dmd2.training import warmup_schedule

    def lrs(decay):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched, out = warmup_schedule(opt, 2, decay, total_steps=6), []
        for _ in range(7):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert lrs("linear") == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = lrs("cosine")
    assert cosine[:3] == [0.5, 1.0, 1.0] and math.isclose(cosine[4], 0.5) and math.isclose(cosine[6], 0.0, abs_tol=1e-12)


def test_a_process_share_of_the_global_batch_is_cut_into_whole_micro_batches():
    """distill.batch_size is global: each process's share, in passes of at most launch.micro_batch samples; a
    shape that does not cut it evenly stops at validation, before any stage runs."""
    from dmd2.config import batch_shares

    assert batch_shares(8, 2, None) == (4, 1)  # the whole share at once
    assert batch_shares(8, 2, 2) == (4, 2)
    assert batch_shares(280, 2, 35) == (140, 4)  # the ImageNet recipe's batch on 2 GPUs
    assert batch_shares(8, 2, 16) == (4, 1)  # a cap above the share: one pass
    with pytest.raises(ConfigError, match=r"launch.micro_batch=3 must divide .* = 4\); e.g. 2"):
        batch_shares(8, 2, 3)
    with pytest.raises(ConfigError, match="must be divisible by the 3 processes"):
        batch_shares(8, 3, None)
    raw = raw_params()
    raw["mnist"]["launch"] = {"distributed": "ddp", "processes_per_machine": 2, "micro_batch": 3}
    with pytest.raises(ConfigError, match=r"mnist: Value error, launch.micro_batch=3 must divide .*\(64 / 2 processes"):
        parse_params(raw)

    # the regression stage runs in the same launch shape, with its own batch and micro-batch (checked when enabled)
    raw["mnist"]["launch"] = {"distributed": "ddp", "processes_per_machine": 2}
    raw["mnist"]["regression"] = {"batch_size": 256, "micro_batch": 100}
    parse_params(raw)
    raw["mnist"]["regression"]["enabled"] = True
    with pytest.raises(ConfigError, match=r"regression.micro_batch=100 must divide each process's share of "
                                          r"regression.batch_size \(256 / 2 processes = 128\); e.g. 64"):
        parse_params(raw)
    raw["mnist"]["regression"]["batch_size"] = 255
    with pytest.raises(ConfigError, match=r"regression.batch_size=255 must be divisible by the 2 processes"):
        parse_params(raw)

