"""Check (or rewrite) the EDM test data in this folder against EDM's own networks.

    python tests/data/edm/make_reference_data.py PATH/TO/EDM-CHECKOUT            # compare, print the differences
    python tests/data/edm/make_reference_data.py PATH/TO/EDM-CHECKOUT --write    # rewrite manifests and outputs

PATH/TO/EDM-CHECKOUT is a clone of https://github.com/NVlabs/edm (CC BY-NC-SA 4.0). This script contains none of
its code: it puts the checkout on `sys.path`, builds EDM's `training.networks.<class_name>` from the constructor
arguments recorded in this folder's JSON files, and records what those networks expose:

- `edm-*.json`, `tiny-*.json`: the state dict's names and shapes in order (built on the meta device);
- `reference-outputs.safetensors`: each case of `reference-outputs.json` evaluated as D(x; σ, labels) on the
  inputs stored in that file (`x`, `sigma`, `class_labels`, `augment_labels`), on the CPU in float32, after the
  weight fill below (the same fill `tests/test_edm_networks.py` applies to our networks).

Only names, shapes, constructor arguments and outputs are written; never code or weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
OUTPUTS = HERE / "reference-outputs.safetensors"
INPUTS = ("x", "sigma", "class_labels", "augment_labels")


def fill(net: torch.nn.Module, seed: int = 2024) -> None:
    """N(0, 0.1²) for every parameter and buffer, N(0, 4²) for Fourier frequencies, in state-dict order from one
    generator; FIR resampling filters untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict(keep_vars=True).items():
            if not name.endswith("resample_filter"):
                t.copy_(torch.randn(t.shape, generator=g) * (4.0 if name.endswith("freqs") else 0.1))


def edm_network(networks, constructor: dict, class_name: str = "EDMPrecond", meta: bool = False) -> torch.nn.Module:
    """EDM's preconditioned network for recorded constructor arguments."""
    with torch.device("meta" if meta else "cpu"):
        return getattr(networks, class_name)(**constructor)


def manifests(networks) -> dict[str, list]:
    """name → [[parameter or buffer name, shape], …] for every manifest in this folder."""
    out = {}
    for path in sorted(HERE.glob("*.json")):
        if path.stem != "reference-outputs":
            spec = json.loads(path.read_text())
            net = edm_network(networks, spec["constructor"], meta=True)
            out[path.stem] = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    return out


def manifest_text(constructor: dict, entries: list) -> str:
    """The manifest files' layout: the constructor on the first line, then one entry per line."""
    rows = ",\n".join(f"  {json.dumps(entry)}" for entry in entries)
    return f'{{"constructor": {json.dumps(constructor)},\n "state_dict": [\n{rows}\n]}}\n'


def outputs(networks) -> dict[str, torch.Tensor]:
    """`<case>.output` for every case of reference-outputs.json, on the stored inputs."""
    stored = load_file(OUTPUTS)
    cases = json.loads((HERE / "reference-outputs.json").read_text())
    results = {}
    for case, arguments in cases.items():
        constructor = dict(arguments)
        net = edm_network(networks, constructor, constructor.pop("class_name")).eval()
        fill(net)
        extra = {"augment_labels": stored["augment_labels"]} if constructor.get("augment_dim") else {}
        with torch.no_grad():
            results[f"{case}.output"] = net(stored["x"], stored["sigma"], stored["class_labels"], **extra).float()
    return results


def checkout_commit(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edm_checkout", type=Path, help="a clone of NVlabs/edm (holds training/networks.py)")
    parser.add_argument("--write", action="store_true", help="rewrite the manifests and reference outputs")
    args = parser.parse_args(argv)
    root = args.edm_checkout.resolve()
    if not (root / "training" / "networks.py").exists():
        parser.error(f"{root} has no training/networks.py: give the root of an NVlabs/edm clone")
    sys.path.insert(0, str(root))
    from training import networks  # EDM's module, from the checkout given

    print(f"EDM checkout {root} at commit {checkout_commit(root)}")
    worst = 0.0
    for name, entries in manifests(networks).items():
        path = HERE / f"{name}.json"
        spec = json.loads(path.read_text())
        same = spec["state_dict"] == entries
        print(f"{path.name}: {len(entries)} entries, {'identical' if same else 'DIFFERENT'}")
        worst = max(worst, 0.0 if same else float("inf"))
        if args.write and not same:
            path.write_text(manifest_text(spec["constructor"], entries))
    fresh, stored = outputs(networks), load_file(OUTPUTS)
    for key, value in fresh.items():
        difference = ((value - stored[key]).abs().max() / stored[key].abs().max()).item() if key in stored else 1.0
        print(f"{key}: largest difference {difference:.2e} of the output's largest value")
        worst = max(worst, difference)
    if args.write:
        save_file({**{k: stored[k].contiguous() for k in INPUTS}, **fresh}, OUTPUTS)
        print(f"wrote {OUTPUTS.name}")
    return 0 if args.write or worst <= 1e-4 else 1  # the tolerance of tests/test_edm_networks.py


if __name__ == "__main__":
    sys.exit(main())
