"""The family seam: every family behind one interface, the normalised model format, pretrained diffusers teachers
recorded by reference, and nothing family-specific outside `dmd2/families/`."""

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from tiny import fresh_copy, run

from dmd2.families import ModelError, family_for, load_model, save_model, student_config, teacher_config
from dmd2.families.diffusers import DiffusersFamily, DiffusersTeacherConfig, resolve_pretrained
from dmd2.families.edm import EDMTeacherConfig, UNetConfig
from dmd2.sampling import few_step_sample, sample

SHAPE, CLASSES = (1, 16, 16), 10
TINY_DIFFUSERS = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
                  "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 4}


def edm_config() -> dict:
    return teacher_config(EDMTeacherConfig(unet=UNetConfig(channels=8, channel_mult=[1, 2])), SHAPE, CLASSES)


def diffusers_config(unet_class: str = "UNet2DModel", prediction_type: str = "epsilon") -> dict:
    cfg = DiffusersTeacherConfig(unet_class=unet_class, unet=TINY_DIFFUSERS, scheduler={"prediction_type": prediction_type})
    return teacher_config(cfg, SHAPE, CLASSES)


CONFIGS = {"edm": edm_config, "diffusers-unet2d": diffusers_config,
           "diffusers-conditional": lambda: diffusers_config("UNet2DConditionModel"),
           "diffusers-v": lambda: diffusers_config(prediction_type="v_prediction")}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_family_keeps_the_interface(name, tmp_path):
    """Build, save in the normalised format, load back; noise, predict, GAN features and both samplers agree
    with what the family declares."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    family = family_for(config)
    net = family.build_network().eval()
    save_model(tmp_path / "teacher", net, config)
    model = load_model(tmp_path / "teacher")
    assert model.family.name == config["family"] and model.family.sample_shape == SHAPE

    n = 4
    noise = torch.randn(n, *SHAPE)
    raw = torch.tensor([0, 3, 9, -1])  # −1: the unconditional branch
    cond = family.encode_conditions(raw, "cpu")
    t = torch.tensor([999, 500, 20, 0])
    with torch.no_grad():
        x0 = family.predict_x0(model.net, family.add_noise(noise, noise, t), t, cond)
        x0_net = family.predict_x0(net, family.add_noise(noise, noise, t), t, cond)
        guided = family.predict_x0(model.net, noise, t, cond, guidance_scale=2.0)
        features = family.gan_features(model.net, noise, t, cond)
    assert x0.shape == (n, *SHAPE) and x0.dtype == torch.float32 and torch.isfinite(guided).all()
    torch.testing.assert_close(x0, x0_net)  # the saved weights are the built ones
    assert features.shape == (n, *family.gan_feature_shape)
    assert family.num_train_timesteps == 1000 and family.num_classes == CLASSES

    # the teacher's own sampler: one step is one x0 prediction from the generator's input at t = 999
    with torch.no_grad():
        one = family.sample_teacher(model.net, noise, cond, 1)
        direct = family.predict_x0(model.net, family.generator_input(noise, torch.full((n,), 999)),
                                   torch.full((n,), 999), cond)
    torch.testing.assert_close(one, direct, rtol=1e-4, atol=1e-4)
    assert model.nfe(3) == family.teacher_nfe(3) and model.steps() == family.default_teacher_steps

    # a student: the same architecture with the generator's timesteps; the one few-step sampler
    save_model(tmp_path / "student", net, student_config(config, [999, 499], {"type": "test"}))
    student = load_model(tmp_path / "student")
    assert student.is_student and student.timesteps == [999, 499] and student.nfe() == 2
    g = torch.Generator().manual_seed(3)
    images = sample(student, noise, raw, generator=g)
    assert images.shape == (n, *SHAPE) and images.abs().max() <= 1
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        by_hand = few_step_sample(family, student.net, noise, cond, [999, 499],
                                  lambda x: torch.randn(x.shape, generator=g))
    torch.testing.assert_close(images, by_hand.clamp(-1, 1))


def test_edm_class_conditions_are_one_hot_and_minus_one_is_the_all_zero_unconditional_input():
    from dmd2.families.edm import one_hot

    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(one_hot(torch.tensor([2, -1, 0]), 3), expected)
    assert one_hot(None, 3) is None and one_hot(torch.tensor([0]), 0) is None


def test_guidance_is_refused_for_a_network_that_never_learned_the_unconditional_branch():
    """EDM's released checkpoints were trained without label dropout: their all-zero label was never seen, so
    guided predictions would be extrapolations. Teachers trained here with label dropout guide as before."""
    from dmd2.families.edm import EDMFamily

    trained = edm_config()
    net = family_for(trained).build_network().eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([10, 900]), torch.eye(CLASSES)[[1, 2]]
    converted = {**trained, "label_dropout": 0.0, "source": {"type": "edm_pickle"}}
    legacy = {k: v for k, v in converted.items() if k != "label_dropout"}  # a config from before the key
    with torch.no_grad():
        assert torch.isfinite(EDMFamily(trained).predict_x0(net, x, t, cond, guidance_scale=2.0)).all()
        for config in (converted, legacy):
            EDMFamily(config).predict_x0(net, x, t, cond)  # unguided: fine
            with pytest.raises(ModelError, match="never learned"):
                EDMFamily(config).predict_x0(net, x, t, cond, guidance_scale=2.0)
    assert trained["label_dropout"] == 0.1 and EDMFamily(trained).has_unconditional_branch


def test_gradient_checkpointing_is_asked_of_the_family_and_keeps_gradients():
    for name in ("edm", "diffusers-unet2d"):
        family = family_for(CONFIGS[name]())
        torch.manual_seed(0)
        plain = family.build_network().train()
        torch.manual_seed(0)
        checkpointed = family.build_network().train()
        family.enable_gradient_checkpointing(checkpointed)
        x, t, cond = torch.randn(2, *SHAPE), torch.tensor([10, 900]), family.encode_conditions(torch.tensor([1, 2]), "cpu")
        for net in (plain, checkpointed):
            family.fake_score_loss(net, x, t, cond, torch.ones_like(x)).backward()
        for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["diffusers-unet2d", "diffusers-conditional"])
def test_diffusers_gan_features_are_the_mid_block_output_and_the_decoder_does_not_run(name):
    """The GAN features are what the mid-block computes in a full forward (caught with a hook), the up blocks and
    the output convolution are not called for them, and the UNet is whole again afterwards (its full forward
    unchanged)."""
    family = family_for(CONFIGS[name]())
    torch.manual_seed(0)
    net = family.build_network().eval()
    x, t, cond = torch.randn(2, *SHAPE), torch.tensor([10, 900]), family.encode_conditions(torch.tensor([1, 2]), "cpu")
    seen: dict[str, torch.Tensor] = {}
    net.mid_block.register_forward_hook(lambda _m, _i, out: seen.__setitem__("mid", out))
    calls = []
    for module in (*net.up_blocks, net.conv_out):
        module.register_forward_hook(lambda m, _i, _o: calls.append(type(m).__name__))
    with torch.no_grad():
        full = family.denoise(net, x, t, cond)
        mid, calls_in_full = seen["mid"], len(calls)
        features = family.gan_features(net, x, t, cond)
        again = family.denoise(net, x, t, cond)
    assert calls_in_full == len(net.up_blocks) + 1 and len(calls) == calls_in_full * 2  # none for the features
    torch.testing.assert_close(features, mid.float(), rtol=0, atol=0)
    torch.testing.assert_close(again, full, rtol=0, atol=0)


def _save_tiny_pipeline(folder: Path) -> None:
    """A diffusers pipeline-style folder (unet/ and scheduler/) written by diffusers itself."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                norm_num_groups=4).save_pretrained(folder / "unet")
    DDPMScheduler(beta_schedule="linear").save_pretrained(folder / "scheduler")


@pytest.mark.slow
def test_a_pretrained_diffusers_teacher_is_recorded_by_reference_and_distilled(prepared, tmp_path):
    _save_tiny_pipeline(tmp_path / "ddpm-tiny")
    root = fresh_copy(prepared, tmp_path / "pretrained")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mnist"]["teacher"] = {"family": "diffusers", "source": "pretrained", "pretrained": str(tmp_path / "ddpm-tiny")}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(root, "teacher")
    teacher = root / "models/mnist/teacher"
    assert not (teacher / "model.safetensors").exists()  # not copied
    config = json.loads((teacher / "config.json").read_text())
    ref = config["pretrained"]
    assert ref["path"] == str(tmp_path / "ddpm-tiny") and ref["subfolder"] == "unet"
    assert len(ref["files"]["diffusion_pytorch_model.safetensors"]["sha256"]) == 64
    assert config["scheduler"]["beta_schedule"] == "linear" and config["num_classes"] == 0

    from diffusers import UNet2DModel

    reference = UNet2DModel.from_pretrained(tmp_path / "ddpm-tiny", subfolder="unet")
    loaded = load_model(teacher).net
    for (k, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k

    run(root, "distill")  # the same loop, the diffusers family
    student = load_model(root / "models/mnist/student")
    assert student.is_student and (root / "models/mnist/student/model.safetensors").exists()
    assert "pretrained" not in student.config

    # the referenced weights changed on disk: loading says so instead of using them silently
    weights = tmp_path / "ddpm-tiny/unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="missing or changed.*rerun `dmd2 teacher`"):
        load_model(teacher)


def test_a_hub_id_that_is_not_cached_offline_says_what_is_missing_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as err:
        resolve_pretrained("google/ddpm-cifar10-32")
    message = str(err.value)
    assert "google/ddpm-cifar10-32" in message and "hf download google/ddpm-cifar10-32" in message
    assert "\n" not in message
    with pytest.raises(ModelError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "no/such/dir"))


def test_config_json_problems_are_one_line_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text('{"format": "dmd2-denoiser/1", "family": "flux"}')
    with pytest.raises(ModelError, match="family 'flux' is not known"):
        load_model(tmp_path / "m")
    (tmp_path / "m/config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelError, match="run the stage that writes it"):
        load_model(tmp_path / "nothing")


def test_the_diffusers_generator_input_is_the_noise_itself_and_its_x0_is_float64_exact():
    family = DiffusersFamily(diffusers_config())
    noise = torch.randn(3, *SHAPE)
    assert torch.equal(family.generator_input(noise, torch.full((3,), 399)), noise)  # the SDXL 1-step recipe's input


def test_the_ddim_teacher_sampler_never_clamps_even_when_the_config_does_not_say(tmp_path):
    """A scheduler config without `clip_sample` (DDIM's default is to clamp x0 to ±1, wrong for latents): an ε-net
    that predicts ε̂ = 0 makes x0 = x_t/√ᾱ, far outside ±1, and two DDIM steps carry it through unclamped."""
    config = diffusers_config()
    del config["scheduler"]["clip_sample"]
    family = DiffusersFamily(config)

    class ZeroEpsilon(torch.nn.Module):
        def forward(self, x, t, **_):
            return torch.zeros_like(x)

    noise = torch.randn(2, *SHAPE)
    x0 = family.sample_teacher(ZeroEpsilon(), noise, None, 2)
    expected = noise.double() / family.alphas_cumprod[999].sqrt()
    assert x0.abs().max() > 5
    torch.testing.assert_close(x0.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_the_ddim_teacher_sampler_is_the_euler_sampler_the_originals_regression_pairs_come_from(guidance):
    """Deterministic DDIM is Euler's method on the probability-flow ODE in σ-space: from the same start and on the
    same (trailing) timesteps it gives what diffusers' EulerDiscreteScheduler gives, as the SDXL pipeline runs it for
    the original's regression pairs (SD's scaled-linear schedule, 50 steps, a nonlinear guided ε-network). The
    pipeline's own start, σ_max·z, is 0.23 % below x_999 = z (docs/differences.md)."""
    from diffusers import EulerDiscreteScheduler

    config = diffusers_config()
    config["scheduler"].update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    family = DiffusersFamily(config)
    torch.manual_seed(0)
    net = family.build_network().eval()
    noise, cond = torch.randn(3, *SHAPE), family.encode_conditions(torch.tensor([1, 4, 7]), "cpu")
    with torch.no_grad():
        ours = family.sample_teacher(net, noise, cond, 50, guidance)
        euler = EulerDiscreteScheduler.from_config(config["scheduler"], timestep_spacing="trailing")
        euler.set_timesteps(50)
        x = noise * (euler.sigmas[0] ** 2 + 1).sqrt()  # x_999 = noise, in σ-space (the pipeline's own: σ_max·noise)
        for t in euler.timesteps:  # as a diffusers pipeline does it: guided ε, then the scheduler's step
            x_in, t_int = euler.scale_model_input(x, t), torch.full((3,), int(t))
            eps, eps_uncond = (net(x_in, t_int, class_labels=c["class_labels"]).sample
                               for c in (cond, family.unconditional(cond)))
            x = euler.step(eps_uncond + guidance * (eps - eps_uncond), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(module, name) for every import in `tree`, lazy ones inside functions included, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                assert node.level - is_package < len(parts), f"{module}: a relative import above the package"
                package = parts[: len(parts) - node.level + is_package]
                base = ".".join(package + [base] * bool(base))
            yield from ((base, alias.name) for alias in node.names)


def seam_breaches(package: Path) -> set[tuple[str, str]]:
    """Every module outside families/ that imports a family's own module (anything below dmd2.families but the
    base class), takes a name from dmd2.families that the package does not export, or compares a value with a
    family's registered name: the ways the loop, stages and tools can know which family they run."""
    import dmd2.families as registry

    found = set()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        if "families" in relative.parts:
            continue
        is_package = relative.name == "__init__"
        module = ".".join(relative.parts[:-1] if is_package else relative.parts)
        tree = ast.parse(path.read_text())
        for imported, name in _imports(tree, module, is_package):
            if imported.startswith("dmd2.families.") and imported != "dmd2.families.base":
                found.add((module, f"imports {imported}"))
            elif imported == "dmd2.families" and name not in (None, "*", "base", *registry.__all__):
                found.add((module, f"imports dmd2.families.{name}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for constant in ast.walk(node):
                    if isinstance(constant, ast.Constant) and constant.value in registry.FAMILIES:
                        found.add((module, f"compares with the family name {constant.value!r}"))
    return found


def test_code_outside_the_family_modules_reaches_a_family_only_through_the_registry(tmp_path):
    """Structural: the import graph and the comparisons of every module, not a list of names to grep for."""
    package = REPO / "src/dmd2"
    assert seam_breaches(package) == set()
    # the check sees what it is meant to: a lazy import in a stage, a relative one, and a name test
    copy = tmp_path / "dmd2"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sampling.py").write_text((copy / "sampling.py").read_text() + "\n\ndef f(model):\n"
                                      "    from dmd2.families.edm import EDMFamily\n    return EDMFamily\n")
    (copy / "report.py").write_text((copy / "report.py").read_text() + "\nfrom .families.diffusers import x  # noqa\n")
    (copy / "evaluate.py").write_text((copy / "evaluate.py").read_text() + "\nWHICH = 1 if 'x' == 'edm' else 0\n")
    assert seam_breaches(copy) == {
        ("dmd2.sampling", "imports dmd2.families.edm"), ("dmd2.report", "imports dmd2.families.diffusers"),
        ("dmd2.evaluate", "compares with the family name 'edm'")}
    # and, besides imports, no family's own vocabulary in the shared code
    pattern = r"EDMAdapter|EDMPrecond|EDMFamily|DiffusersFamily|channel_mult|label_dim|karras|heun|sigma_data|one_hot"
    found = subprocess.run(["grep", "-rnE", pattern, "src/dmd2", "--include=*.py"], cwd=REPO, capture_output=True,
                           text=True).stdout.splitlines()
    outside = [line for line in found if not line.startswith("src/dmd2/families/")]
    assert outside == [], outside


def test_the_package_s_imports_have_no_cycle():
    """Module to module, lazy imports included (a family's module is one a stage imports only by name): the import
    graph of dmd2 is acyclic, so any module can be imported first and read on its own."""
    import graphlib

    package = REPO / "src/dmd2"
    modules = {}
    for path in package.rglob("*.py"):
        relative = path.relative_to(package.parent).with_suffix("")
        is_package = relative.name == "__init__"
        modules[".".join(relative.parts[:-1] if is_package else relative.parts)] = (path, is_package)
    graph = {}
    for module, (path, is_package) in modules.items():
        targets = set()
        for imported, name in _imports(ast.parse(path.read_text()), module, is_package):
            full = f"{imported}.{name}"
            targets.add(full if full in modules else imported)
        graph[module] = targets & set(modules) - {module}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError, naming the cycle
    assert order.index("dmd2.families.base") < order.index("dmd2.families.flow")  # imported before its importers
