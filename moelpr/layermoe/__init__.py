"""LayerMoE (docs/method.md §4): per-layer cross-lingual similarity (`similarity`), the expert allocation it
implies (`allocation`), and the training steps it adds to MoE-LPR: stage-2 classifiers and lifelong expansion
(`training`).

Submodules are imported by name (`moelpr.layermoe.allocation` does not import torch, so `moe-lpr allocate`
stays light).
"""
