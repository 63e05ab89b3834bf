"""tools/provenance.py: the share of a file's 10-token runs found in another project's code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("provenance", ROOT / "tools" / "provenance.py")
provenance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(provenance)

THEIRS = '''
import torch.nn.functional as F
def block(x, weight, groups):
    """Theirs."""
    y = F.group_norm(x, num_groups=groups)  # normalise
    y = F.silu(y)
    return F.conv2d(y, weight, padding=weight.shape[-1] // 2) + x
'''
# the same statements, with other layout, comments, docstring, quotes and import alias
COPIED = '''
import torch
def block(x, weight, groups):
    y = torch.nn.functional.group_norm(x, num_groups=groups)
    y = torch.nn.functional.silu(y)   # activation
    return torch.nn.functional.conv2d(y, weight, padding=weight.shape[-1] // 2) + x
'''
INDEPENDENT = '''
def residual(h, kernel, count):
    out = torch.nn.GroupNorm(count, h.shape[1])(h).relu()
    return h + torch.conv2d(out, kernel, stride=1, padding="same")
'''


def test_a_copy_is_found_whatever_its_layout_and_aliases():
    theirs = provenance.runs(THEIRS)
    assert provenance.shared_percent(provenance.runs(COPIED), theirs) > 80
    assert provenance.shared_percent(provenance.runs(INDEPENDENT), theirs) == 0


def test_the_command_fails_over_the_limit_and_names_the_file(tmp_path, capsys):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "net.py").write_text(THEIRS)
    (tmp_path / "copied.py").write_text(COPIED)
    (tmp_path / "ours.py").write_text(INDEPENDENT)
    assert provenance.main([str(tmp_path / "ours.py"), "--against", str(tmp_path / "theirs")]) == 0
    assert provenance.main([str(tmp_path / "copied.py"), "--against", str(tmp_path / "theirs")]) == 1
    assert "copied.py   <- over the limit" in capsys.readouterr().out
