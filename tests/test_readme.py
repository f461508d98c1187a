"""The README's AdderNet recipe runs as written, and says what mode PTQ returns the model in."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import quantkit

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _code_block_after(heading: str) -> str:
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_adderize_recipe_runs():
    code = _code_block_after("### Making an AdderNet")
    assert "adderize(" in code and '"adder_ptq4"' in code
    env = {"loader": [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]}
    exec(compile(code, "README.md", "exec"), env)
    adder_model, qmodel = env["adder_model"], env["qmodel"]
    assert sum(type(m).__name__ == "AdderConv2d" for m in adder_model.modules()) == 19  # all but the stem
    assert isinstance(adder_model.conv1, torch.nn.Conv2d) and type(adder_model.conv1).__name__ == "Conv2d"
    rep = quantkit.report(qmodel)
    assert len(rep.quantized) == 19 and {r.bits_w for r in rep.quantized} == {4}
    assert not qmodel.training  # as the README's "Train / eval mode" says


def test_readme_documents_the_mode_ptq_returns():
    section = README[README.index("### Train / eval mode"):]
    section = section[:section.index("\n### ")]
    assert "eval mode" in section and "quantize" in section and "prepare" in section
