"""scripts/ablation_table.py: per-seed values and their mean, variants missing from a seed left out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("ablation_table", REPO_ROOT / "scripts" / "ablation_table.py")
ablation_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation_table)


def _heldout(itm: float, r1: float, vd: bool = True) -> dict:
    return {"itm_acc": itm, "t2i_r1": r1, "i2t_r1": r1 + 2, "para_itm_acc": itm - 0.05,
            "para_t2i_r1": r1 - 10, "para_i2t_r1": r1 - 8, "vd_enabled": vd, "vd_perplexity": 64.0,
            "vd_num_codes": 128}


def test_table_means_over_seeds_and_marks_missing(tmp_path: Path) -> None:
    files = []
    for seed, (a, b) in enumerate(((0.95, 56.0), (0.99, 78.0))):
        variants = {"vd": {"heldout": _heldout(a, b)}}
        if seed == 0:
            variants["no_vd"] = {"heldout": _heldout(0.99, 84.0, vd=False)}
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"seed": seed, "variants": variants}))
        files.append(str(path))
    out = ablation_table.main(files).splitlines()
    assert out[0].startswith("| variant | seeds | ITM |")
    vd = out[2].split(" | ")
    assert vd[0] == "| vd" and vd[1] == "0, 1"
    assert vd[2] == "**0.970** (0.950 / 0.990)" and vd[3] == "**67** (56 / 78)"
    assert vd[-1] == "**0.500** (0.500 / 0.500) |"
    no_vd = out[3].split(" | ")
    assert no_vd[1] == "0" and no_vd[2] == "0.990" and no_vd[-1] == "— |"
