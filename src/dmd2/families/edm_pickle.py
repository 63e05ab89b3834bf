"""Read EDM's released `.pkl` checkpoints without running the code inside them.

EDM pickles each network through `torch_utils.persistence`: unpickling calls
`_reconstruct_persistent_obj(meta)`, which executes `meta["module_src"]` — the network's Python source, embedded in
the file — to re-create its class. A normal `pickle.load` therefore runs whatever code the file carries. Here:

1. the pickle's globals are listed first with `pickletools` (which only parses), and a file that names anything
   outside `ALLOWED_GLOBALS` is refused before a single object is built;
2. the unpickler resolves only those globals, to functions of our own: persistent objects become `Record`s
   (class name + state, the embedded source is never executed), module containers become `Record`s too, and tensor
   storages are read with `torch.load(..., weights_only=True)` instead of the unrestricted `torch.load` that
   `torch.storage._load_from_bytes` performs;
3. the network's parameters and buffers are collected by walking the records' `_parameters`, `_buffers` and
   `_modules`, and loaded strictly into our own network (`edm_networks`), built from the recorded constructor
   arguments with dropout set to 0.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import pickletools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmd2.families.base import ModelError


class Record:
    """Stands in for every object the pickle would have re-created: what it was, and its state."""

    def __init__(self, class_name: str = "", state: Any = None):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state: Any) -> None:  # BUILD on a container (`ModuleDict`, `ModuleList`)
        self.state = state


def _persistent_object(meta: dict[str, Any]) -> Record:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: keeps the class name and state, never
    runs `meta['module_src']`."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise ModelError(f"an EDM persistent object has an unexpected record ({type(meta).__name__})")
    return Record(str(meta.get("class_name")), meta.get("state"))


def _container(name: str):
    class Container(Record):
        def __init__(self):
            super().__init__(name)

    Container.__name__ = name
    return Container


def _storage_from_bytes(data: bytes) -> Any:
    """Stand-in for `torch.storage._load_from_bytes`, whose real body is an unrestricted `torch.load`."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        raise ModelError(f"a tensor storage inside the pickle is not plain tensor data and was refused ({err})") from None


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> float | int | bool:
    """Stand-in for numpy's scalar rebuild (EDM's modules keep numpy floats such as skip_scale = np.sqrt(0.5)):
    numeric types only, returned as Python numbers."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise ModelError(f"a numpy scalar of type {dtype!r} inside the pickle was refused (numbers only)")
    return np.frombuffer(data, dtype=dtype)[0].item()


# Every global a released EDM checkpoint needs, and why. Anything else is refused by name.
ALLOWED_GLOBALS: dict[tuple[str, str], tuple[Any, str]] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        (_persistent_object, "each EDM network object; replaced by a record of class name and state"),
    ("torch._utils", "_rebuild_tensor_v2"): (torch._utils._rebuild_tensor_v2, "a tensor view on a storage"),
    ("torch._utils", "_rebuild_parameter"): (torch._utils._rebuild_parameter, "an nn.Parameter around a tensor"),
    ("torch.storage", "_load_from_bytes"):
        (_storage_from_bytes, "a tensor storage; read with torch.load(weights_only=True)"),
    ("collections", "OrderedDict"): (OrderedDict, "nn.Module's parameter, buffer, module and hook tables"),
    ("torch.nn.modules.container", "ModuleDict"): (_container("ModuleDict"), "EDM's enc/dec block tables"),
    ("torch.nn.modules.container", "ModuleList"): (_container("ModuleList"), "module lists"),
    ("torch.nn.modules.container", "Sequential"): (_container("Sequential"), "module sequences"),
    ("numpy", "dtype"): (np.dtype, "the type of a numpy scalar"),
    ("numpy.core.multiarray", "scalar"): (_numpy_scalar, "numpy scalars kept as module attributes"),
    ("numpy._core.multiarray", "scalar"): (_numpy_scalar, "the same, as numpy 2 spells it"),
    ("builtins", "set"): (set, "nn.Module's set of non-persistent buffer names (pickle protocols 2 and 3)"),
    ("_codecs", "encode"): (codecs.encode, "bytes objects in a protocol-2 pickle (text encoded back to bytes)"),
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles spell some globals the Python 2 way (`__builtin__.set`); compare them as Python 3 does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle refers to, found by parsing its opcodes; nothing is executed."""
    found, strings, memo = [], [], {}
    top = None  # the string the previous opcode pushed, if it pushed one
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name, pushed = opcode.name, None
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(_python3_name(module, attr))
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                          "BINSTRING", "STRING"):
                pushed = str(arg)
            elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # names the top of the stack; pushes nothing
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = top
                continue
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(int(arg))
            elif name == "STACK_GLOBAL":
                found.append(_python3_name(strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
            if pushed is not None:
                strings.append(pushed)
            top = pushed
    except Exception as err:
        raise ModelError(f"not a readable pickle ({err})") from None
    return sorted(set(found))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        if (module, name) not in ALLOWED_GLOBALS:
            raise ModelError(f"refused global {module}.{name}")
        return ALLOWED_GLOBALS[(module, name)][0]

    def persistent_load(self, pid: Any) -> Any:
        raise ModelError("the pickle uses persistent ids (a torch.save zip?), which EDM's pickles never do")


def _check_plain_pickle(path: Path, data: bytes) -> None:
    """Name the common wrong files before parsing: empty, zipped (a torch.save file or a zip), gzipped."""
    if not data:
        raise ModelError(f"{path} is empty: download it again")
    if data[:2] == b"PK":
        raise ModelError(f"{path} is a zip archive (a torch.save file, or a zipped pickle), not one of EDM's network "
                         "pickles: unzip it, or point teacher.pickle at the .pkl EDM released")
    if data[:2] == b"\x1f\x8b":
        raise ModelError(f"{path} is gzip-compressed: decompress it (gunzip) and point teacher.pickle at the .pkl")


def read_edm_pickle(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an EDM checkpoint, with every object a `Record` (nothing executed)."""
    path = Path(path)
    data = path.read_bytes()
    _check_plain_pickle(path, data)
    try:
        refused = [f"{m}.{n}" for m, n in pickle_globals(data) if (m, n) not in ALLOWED_GLOBALS]
    except ModelError as err:
        raise ModelError(f"{path}: {err}; EDM's network pickles are whole, uncompressed pickle files") from None
    if refused:
        named = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise ModelError(f"{path} refers to {named}, which an EDM checkpoint never needs: refused, nothing was "
                         "executed. Is it one of EDM's network pickles?")
    try:
        top = _RestrictedUnpickler(io.BytesIO(data)).load()
    except ModelError as err:
        raise ModelError(f"{path}: {err}") from None
    except Exception as err:
        raise ModelError(f"{path} is not a readable EDM checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(top, dict) or not isinstance(top.get("ema"), Record):
        raise ModelError(f"{path} has no `ema` network (EDM checkpoints are dict(ema=..., loss_fn=..., ...))")
    return top


def record_state_dict(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a recorded nn.Module: its parameters and persistent buffers, then its children's."""
    state = record.state if isinstance(record.state, dict) else {}
    out: dict[str, torch.Tensor] = {}
    skipped = set(state.get("_non_persistent_buffers_set") or ())
    for table in ("_parameters", "_buffers"):
        for name, value in (state.get(table) or {}).items():
            if value is not None and name not in skipped:
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


PRECONDITIONERS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
NETWORKS = {"DhariwalUNet": "adm", "SongUNet": "songunet"}
# Constructor arguments that belong to the preconditioner or describe the data, not the raw network.
_OUTER_KWARGS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type", "sigma_min", "sigma_max",
                 "sigma_data", "beta_d", "beta_min", "M", "epsilon_t"}


def network_config_from_edm(class_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our config for an EDM network from its class and recorded constructor arguments: architecture,
    preconditioning, data shape and the raw network's own arguments (dropout set to 0, as DMD2 distils)."""
    cls = class_name.rsplit(".", 1)[-1]
    if cls not in PRECONDITIONERS:
        raise ModelError(f"EDM network class {class_name!r} is not supported (supported: {', '.join(PRECONDITIONERS)})")
    model_type = kwargs.get("model_type", "DhariwalUNet" if cls == "EDMPrecond" else "SongUNet")
    if model_type not in NETWORKS:
        raise ModelError(f"EDM network type {model_type!r} is not supported (supported: {', '.join(NETWORKS)})")
    if cls == "VPPrecond" and (kwargs.get("beta_d", 19.9), kwargs.get("beta_min", 0.1), kwargs.get("M", 1000)) != (19.9, 0.1, 1000):
        raise ModelError("a VP checkpoint with a non-default schedule (beta_d, beta_min, M) is not supported")
    if "img_channels" not in kwargs or "img_resolution" not in kwargs:
        raise ModelError(f"the recorded {cls} arguments lack img_channels/img_resolution: not an EDM network")
    network = {k: v for k, v in kwargs.items() if k not in _OUTER_KWARGS}
    network["dropout"] = 0.0
    if model_type == "SongUNet":
        architecture = "ncsnpp" if network.get("embedding_type") == "fourier" else "ddpmpp"
    else:
        architecture = "adm"
    return {"architecture": architecture, "precond": PRECONDITIONERS[cls], "network": _plain(network),
            "in_channels": int(kwargs["img_channels"]), "resolution": int(kwargs["img_resolution"]),
            "label_dim": int(kwargs.get("label_dim", 0)), "sigma_data": float(kwargs.get("sigma_data", 0.5))}


def convert_edm_pickle(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An EDM checkpoint → (our network config, its state dict), loaded strictly into our network to prove the
    names and shapes agree. Nothing in the file is executed."""
    from dmd2.families.edm_networks import Preconditioned, build_edm_network

    record = read_edm_pickle(path)["ema"]
    state = record.state if isinstance(record.state, dict) else {}
    config = network_config_from_edm(record.class_name, dict(state.get("_init_kwargs") or {}))
    weights = record_state_dict(record)
    with torch.device("meta"):
        net = Preconditioned(build_edm_network(config["architecture"], config["resolution"], config["in_channels"],
                                               config["label_dim"], config["network"]), config["precond"])
    expected = net.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        first = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") \
            or f"{wrong[0]}"
        raise ModelError(f"{path}: the network does not match our {config['architecture']} ({len(missing)} tensors "
                         f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape; first: {first})")
    return config, {k: weights[k].float().contiguous() for k in expected}


def _plain(value: Any) -> Any:
    """JSON-ready copies of recorded arguments (tuples → lists, numpy numbers → Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

