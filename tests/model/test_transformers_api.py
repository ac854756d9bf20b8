"""Our own calls into transformers use no deprecated argument or field (checked in a fresh process, so
`warning_once` messages an earlier test triggered are not hidden by its cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, logging, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
import transformers
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_warning()
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())

hf_logging.get_logger("transformers").addHandler(Keep())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import moelpr
    from tiny import tiny_ids, tiny_model, trained_moe

    ids = tiny_ids()
    moe = trained_moe(num_experts=3)
    moelpr.add_classifiers(moe, [0, 2], num_classes=2)
    with torch.no_grad():
        out = moe(input_ids=ids, use_cache=True, output_router_logits=True)
        cache = getattr(out, moelpr.model.CACHE_ARG)
        moe(input_ids=ids[:, :1], cache=cache, use_cache=True)
        moe.generate(ids[:1, :5], attention_mask=torch.ones_like(ids[:1, :5]), max_new_tokens=4, do_sample=False,
                     pad_token_id=0)
    moe.train()
    labels = ids.clone()
    moe(input_ids=ids, labels=labels, lang_mask=torch.ones_like(ids), lang_group=torch.zeros_like(ids),
        compute_logits=False).loss.backward()
    moelpr.save_model(moe, sys.argv[2], format="full")
    moelpr.load_model(sys.argv[2])
print(json.dumps({"logs": records, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def test_no_deprecation_from_our_calls(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    deprecated = [m for m in seen["logs"] + seen["warnings"] if "deprecat" in m.lower()]
    assert not deprecated, deprecated
