"""Upcycling: a dense HF causal LM into an MoE-LPR model (`upcycle` in memory, `stream_upcycle` shard by shard for
`moe-lpr upcycle`), growing it (`expand`: lifelong expansion, `add_classifiers`: LayerMoE), and what each training
stage trains (`set_trainable`)."""
