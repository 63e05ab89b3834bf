"""EDM's released networks: our ADM / DDPM++ / NCSN++ match EDM's checkpoints name for name and shape for shape,
compute what EDM's own networks compute, and EDM's pickles are converted without executing anything they carry.

Test data (`tests/data/edm/`, see its README): names, shapes, constructor arguments and outputs recorded from EDM's
networks by running them (a local clone of NVlabs/edm, not in this repository; its commit was not recorded):
- `edm-*.json`: the constructor arguments of a released checkpoint's `ema` network and its state dict's names and
  shapes in order (ImageNet-64 ADM: 553 entries, 295,899,267 parameters; CIFAR-10 DDPM++: 427 entries, 55,735,299);
- `tiny-*.json`: the same for tiny configurations;
- `reference-outputs.*`: EDM's networks' outputs for fixed inputs under the weight fill `_fill` below.
`tests/data/edm/make_reference_data.py` redoes both from any EDM clone.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from edm_fixtures import build_edm as build
from edm_fixtures import edm_style_pickle
from safetensors.torch import load_file

from dmd2.families import ModelError
from dmd2.families.edm_pickle import ALLOWED_GLOBALS, pickle_globals, read_edm_pickle

DATA = Path(__file__).parent / "data" / "edm"


@pytest.mark.parametrize("name", sorted(p.stem for p in DATA.glob("*.json") if p.stem != "reference-outputs"))
def test_state_dict_names_and_shapes_match_edm(name):
    spec = json.loads((DATA / f"{name}.json").read_text())
    net = build(spec["constructor"], meta=True)
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert ours == spec["state_dict"]


def test_full_size_parameter_counts_match_the_published_networks():
    counts = {}
    for name in ("edm-imagenet-64x64-cond-adm", "edm-cifar10-32x32-cond-vp"):
        net = build(json.loads((DATA / f"{name}.json").read_text())["constructor"], meta=True)
        counts[name] = sum(p.numel() for p in net.parameters())
    assert counts == {"edm-imagenet-64x64-cond-adm": 295_899_267, "edm-cifar10-32x32-cond-vp": 55_735_299}


def _fill(net: torch.nn.Module) -> None:
    """The weight fill the reference outputs were computed under: N(0, 0.1²) for every parameter, N(0, 4²) for
    NCSN++'s Fourier frequencies, in state-dict order from one generator; FIR filters untouched."""
    g = torch.Generator().manual_seed(2024)
    with torch.no_grad():
        for name, t in net.state_dict(keep_vars=True).items():
            if not name.endswith("resample_filter"):
                t.copy_(torch.randn(t.shape, generator=g) * (4.0 if name.endswith("freqs") else 0.1))


@pytest.mark.parametrize("case", ["adm", "adm_heads", "ddpmpp", "ddpmpp_vp", "ncsnpp"])
def test_outputs_match_edm_networks(case):
    constructors = json.loads((DATA / "reference-outputs.json").read_text())
    ref = load_file(DATA / "reference-outputs.safetensors")
    constructor = dict(constructors[case])
    net = build(constructor, constructor.pop("class_name")).eval()
    _fill(net)
    with torch.no_grad():
        model_kwargs = {"augment_labels": ref["augment_labels"]} if constructor.get("augment_dim") else {}
        sigma = ref["sigma"].reshape(-1, 1, 1, 1)
        from dmd2.families.edm_networks import precondition

        c_skip, c_out, c_in, c_noise = precondition(net.kind, sigma, net.sigma_data)
        out = c_skip * ref["x"] + c_out * net.model(c_in * ref["x"], c_noise.flatten(), ref["class_labels"], **model_kwargs)
    expected = ref[f"{case}.output"]
    assert (out - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (out - ref["x"]).abs().max() > 0.5  # the network's own contribution is being compared, not c_skip·x


def test_features_stop_at_the_encoder_output():
    net = build(json.loads((DATA / "tiny-adm.json").read_text())["constructor"])
    x = torch.randn(2, 3, 16, 16)
    features = net(x, torch.tensor([1.0, 2.0]), None, features_only=True)
    assert features.shape == (2, 128, 8, 8)  # model_channels · channel_mult[-1] at 16 / 2 px


_STAND_IN_NETWORKS = """
import torch
from dmd2.families.edm_networks import build_edm_network, precondition
from dmd2.families.edm_pickle import network_config_from_edm


class _Preconditioned(torch.nn.Module):  # EDM's constructor and call signature, over our networks
    def __init__(self, **constructor):
        super().__init__()
        c = network_config_from_edm(type(self).__name__, constructor)
        self.kind, self.sigma_data = c["precond"], c["sigma_data"]
        self.model = build_edm_network(c["architecture"], c["resolution"], c["in_channels"], c["label_dim"],
                                       c["network"])

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        c_skip, c_out, c_in, c_noise = precondition(self.kind, sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels, **model_kwargs)


class EDMPrecond(_Preconditioned):
    pass


class VPPrecond(_Preconditioned):
    pass
"""


def test_the_reference_data_script_reproduces_the_committed_files(tmp_path, monkeypatch, capsys):
    """`make_reference_data.py` against a stand-in checkout whose `training.networks` wraps our networks: every
    manifest comes out identical and every output within the numerical test's tolerance, so the script's procedure
    (constructors, fill, inputs, call) is the one that produced the files."""
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "training" / "networks.py").write_text(_STAND_IN_NETWORKS)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the checkout; undone afterwards
    for name in ("training", "training.networks"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(DATA))
    import make_reference_data

    assert make_reference_data.main([str(tmp_path)]) == 0
    report = capsys.readouterr().out
    manifests = [p for p in DATA.glob("*.json") if p.stem != "reference-outputs"]
    assert report.count(": 553 entries, identical") == 1 and report.count("identical") == len(manifests), report
    assert report.count(".output: largest difference") == 5, report
    for name in ("training", "training.networks"):
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------- pickles


def test_an_edm_pickle_converts_to_the_same_network(tmp_path):
    constructor = json.loads((DATA / "tiny-ddpmpp.json").read_text())["constructor"]
    original = build(constructor).eval()
    _fill(original)
    edm_style_pickle(original, {**constructor, "dropout": 0.13}, tmp_path / "net.pkl")

    assert {f"{m}.{n}" for m, n in pickle_globals((tmp_path / "net.pkl").read_bytes())} <= {
        f"{m}.{n}" for m, n in ALLOWED_GLOBALS}
    from dmd2.families.edm_pickle import convert_edm_pickle

    config, state = convert_edm_pickle(tmp_path / "net.pkl")
    assert config["architecture"] == "ddpmpp" and config["precond"] == "edm" and config["network"]["dropout"] == 0.0
    converted = build(constructor).eval()
    converted.load_state_dict(state, strict=True)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 5.0]), torch.eye(10)[[2, 4]]
    with torch.no_grad():
        assert torch.equal(converted(x, sigma, labels), original(x, sigma, labels))


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


class _NestedLoad:
    """A 'storage' whose bytes are themselves a pickle that runs a command: torch.storage._load_from_bytes would
    hand them to an unrestricted torch.load."""

    def __init__(self, command: str):
        import io

        buffer = io.BytesIO()
        torch.save(_System(command), buffer)  # the zip format torch.load reads, with a command inside
        self.payload = buffer.getvalue()

    def __reduce__(self):
        from torch.storage import _load_from_bytes

        return _load_from_bytes, (self.payload,)


@pytest.mark.parametrize("attack, refused", [
    (_System, "posix.system"),
    (_Eval, "builtins.eval"),
    (_NestedLoad, "not plain tensor data"),
])
def test_hostile_pickles_are_refused_without_running_anything(tmp_path, attack, refused):
    marker = tmp_path / "pwned"
    payload = attack(f"touch {marker}") if attack is not _Eval else attack(f"open({str(marker)!r}, 'w')")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload, "loss_fn": None}, protocol=4))
    with pytest.raises(ModelError, match=refused):
        read_edm_pickle(path)
    assert not marker.exists()


def test_a_network_of_another_shape_is_refused_in_one_line(tmp_path):
    from dmd2.families.edm_pickle import convert_edm_pickle

    constructor = json.loads((DATA / "tiny-ddpmpp.json").read_text())["constructor"]
    net = build(constructor)
    net.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))  # a tensor our network does not have
    edm_style_pickle(net, constructor, tmp_path / "net.pkl")
    with pytest.raises(ModelError) as err:
        convert_edm_pickle(tmp_path / "net.pkl")
    message = str(err.value)
    assert "0 tensors missing, 1 unexpected, 0 of another shape; first: unexpected" in message and "stray" in message
    assert len(message.splitlines()) == 1 and len(message) < 200 + len(str(tmp_path))


def test_a_refusal_naming_many_globals_stays_short(tmp_path):
    import collections
    import io as io_module

    path = tmp_path / "many.pkl"
    path.write_bytes(pickle.dumps({"ema": [os.system, os.popen, eval, exec, io_module.BytesIO, collections.Counter]}))
    with pytest.raises(ModelError) as err:
        read_edm_pickle(path)
    message = str(err.value)
    assert "_io.BytesIO, builtins.eval, builtins.exec and 3 more" in message and "nothing was executed" in message
    assert len(message.splitlines()) == 1 and len(message) < 200 + len(str(path))  # two terminal lines, not six


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL opcodes, and STACK_GLOBAL built from two pushed strings
def test_each_layer_of_the_reader_refuses_on_its_own(tmp_path, protocol):
    import io

    from dmd2.families.edm_pickle import _RestrictedUnpickler

    marker = tmp_path / "pwned"
    data = pickle.dumps({"ema": _System(f"touch {marker}")}, protocol=protocol)
    assert ("posix", "system") in pickle_globals(data)  # the opcode scan sees the global, whatever the opcode
    with pytest.raises(ModelError, match="refused global posix.system"):  # the unpickler refuses without the scan
        _RestrictedUnpickler(io.BytesIO(data)).load()
    assert not marker.exists()


def test_wrong_kinds_of_file_are_named_and_a_benign_protocol_2_pickle_reads(tmp_path):
    import gzip
    import zipfile

    wrong = {"empty.pkl": b"", "cut.pkl": pickle.dumps({"ema": [1, 2, 3]}, protocol=4)[:-9],
             "net.pkl.gz": gzip.compress(pickle.dumps({"ema": 1})), "net.zip": b""}
    with zipfile.ZipFile(tmp_path / "net.zip", "w") as z:
        z.writestr("net.pkl", pickle.dumps({"ema": 1}))
    for name, data in wrong.items():
        if data or name == "empty.pkl":
            (tmp_path / name).write_bytes(data)
    for name, says in [("empty.pkl", "is empty"), ("cut.pkl", "not a readable pickle"), ("net.pkl.gz", "gunzip"),
                       ("net.zip", "is a zip archive")]:
        with pytest.raises(ModelError) as err:
            read_edm_pickle(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and says in str(err.value)
        assert len(str(err.value).splitlines()) == 1
    # protocol 2 spells bytes as _codecs.encode(text, "latin1"): harmless, and read
    (tmp_path / "p2.pkl").write_bytes(pickle.dumps({"ema": torch.nn.Linear(1, 1).state_dict(), "raw": b"\x00\xff"},
                                                   protocol=2))
    with pytest.raises(ModelError, match="no `ema` network"):  # past both layers: refused only for what it holds
        read_edm_pickle(tmp_path / "p2.pkl")
