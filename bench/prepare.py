"""`moe-lpr prepare` at two corpus sizes: throughput against the bare tokenizer, scaling, memory, disk, start-up.

    python bench/prepare.py --workdir /big/disk/bench-prepare           # 256 MiB and 1 GiB of text (~15 min)
    python bench/prepare.py --workdir /tmp/bench-prepare --small        # 8 and 32 MiB: a quick check

Everything is made on the spot: a synthetic corpus in four made-up languages (Greek, Cyrillic, Latin with
Hungarian and with Turkish letters; Zipf-distributed words, one big file and several small ones), a byte-level
BPE tokenizer with a vocabulary over 65,536 trained on it (so ids are int32), and a tiny Llama with that
vocabulary. Measured in the same run, each prepare in a fresh process:

- the bare fast tokenizer (`encode_batch_fast`, one thread, the texts already in memory) on the smaller corpus,
  against `moe-lpr prepare --num-proc 1` on the same files (reading, tokenising and writing): goal >= 0.8x;
- the speed-up of `--num-proc 2` over 1 on the smaller corpus;
- peak RSS (the largest process) of `--num-proc 2` at both sizes: goal larger/smaller <= 1.15;
- bytes per token on disk of the larger dataset: goal <= 4.1;
- seconds from the start of a `moe-lpr train` process to the end of step 1 on each prepared dataset: goal
  < 30 s and not growing with the size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process, for the bare tokenizer too

LANGUAGES = {  # name: (alphabet, role)
    "el": ("αβγδεζηθικλμνξοπρστυφχψωάέίόύή", "new"),
    "ru": ("абвгдежзийклмнопрстуфхцчшщыэюя", "new"),
    "hu": ("abcdefghijklmnoprstuvzáéíóöőúüű", "new"),
    "tr": ("abcçdefgğhıijklmnoöprsştuüvyz", "old"),
}
VOCAB = 70_000
CUTOFF = 1024


# ------------------------------------------------------------------------------------------- the corpus


def _sentences(alphabet: str, rng: random.Random, n: int = 30_000) -> list[str]:
    """A language: 40,000 words drawn with Zipf frequencies into `n` sentences."""
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 11))) for _ in range(40_000)]
    cumulative = list(itertools.accumulate(1 / (r + 1) for r in range(len(words))))
    out = []
    for _ in range(n):
        text = " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 25)))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def make_corpus(root: Path, total_mb: int, seed: int = 0) -> Path:
    """About `total_mb` MiB of JSON lines over four languages; returns the corpora YAML."""
    entries = []
    per_language = (total_mb << 20) // len(LANGUAGES)
    for i, (lang, (alphabet, role)) in enumerate(LANGUAGES.items()):
        rng = random.Random(f"{seed}-{lang}")
        pool = _sentences(alphabet, rng)
        files = 1 if i == 0 else 4  # one big file (cut into byte ranges) and groups of files
        for f in range(files):
            path = root / lang / f"{lang}-{f}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            size = 0
            with open(path, "w", encoding="utf-8") as out:
                while size < per_language // files:
                    doc = " ".join(rng.choices(pool, k=rng.randint(5, 60)))
                    line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                    out.write(line)
                    size += len(line.encode("utf-8"))
        entries.append(f"  - {{name: {lang}, path: {lang}/*.jsonl, language: {lang}, role: {role}}}\n")
    spec = root / "corpora.yaml"
    spec.write_text("corpora:\n" + "".join(entries))
    return spec


def make_model(corpus_root: Path, out: Path, sample_mb: int, vocab: int = VOCAB) -> Path:
    """A byte-level BPE tokenizer (`vocab` tokens: > 65,536 by default) trained on the corpus, a tiny Llama with it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def sample():
        for path in sorted(corpus_root.glob("*/*.jsonl")):
            with open(path, encoding="utf-8") as f:
                read = 0
                for line in f:
                    read += len(line)
                    yield json.loads(line)["text"]
                    if read > (sample_mb << 20) // len(LANGUAGES) // 4:
                        break

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sample(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if len(tok) < vocab:
        raise SystemExit(f"the tokenizer reached only {len(tok)} of {vocab} tokens; give it more text (--tokenizer-mb)")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CUTOFF,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------- measurements


def bare_tokenizer(spec_root: Path, model: Path) -> dict:
    """tokens/s of `encode_batch_fast` (+ EOS per document, as prepare counts) on texts already in memory, in a
    fresh process (this one holds other work's memory, and its speed is not a bare tokenizer's)."""
    proc = subprocess.run(
        [sys.executable, __file__, "_bare", str(spec_root), str(model)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bare(spec_root: str, model: str) -> None:
    """Inside the fresh process: each file's texts read into memory, then only the encoding timed."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(model).backend_tokenizer
    tokens, seconds = 0, 0.0
    for path in sorted(Path(spec_root).glob("*/*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        start = time.perf_counter()
        for i in range(0, len(texts), 1000):
            encoded = backend.encode_batch_fast(texts[i : i + 1000], add_special_tokens=False)
            tokens += sum(len(e.ids) + 1 for e in encoded)
        seconds += time.perf_counter() - start
    print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}))


def run_measured(argv: list[str]) -> dict:
    """Run `python bench/prepare.py _run ARGV...` (moelpr's CLI in a fresh process); its time and peak RSS."""
    proc = subprocess.run([sys.executable, __file__, "_run", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(argv: list[str]) -> None:
    """Inside the measured process: time the verb (imports excluded) and report the peak RSS of it and its children."""
    from moelpr.cli import main

    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        code = main(argv)
        sys.stdout = stdout
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries the launching process's peak RSS across fork and exec into ru_maxrss, so
    # it would report this benchmark's own memory. Worker processes report theirs through RUSAGE_CHILDREN.
    own = _vm_hwm_kib() / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"code": code, "seconds": seconds, "rss_mib": own, "children_rss_mib": children}))


def _vm_hwm_kib() -> int:
    """This process's own peak RSS (kB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def prepare(spec: Path, model: Path, out: Path, procs: int, shard_mb: int) -> dict:
    argv = ["prepare", str(spec), "--tokenizer", str(model), "--cutoff-len", str(CUTOFF), "--output", str(out)]
    result = run_measured([*argv, "--num-proc", str(procs), "--shard-mb", str(shard_mb), "--quiet"])
    manifest = json.loads((out / "moelpr_prepared.json").read_text())
    tokens = sum(e["tokens"] + e["dropped"] for e in manifest["corpora"])
    kept = sum(e["tokens"] for e in manifest["corpora"])
    peak = max(result["rss_mib"], result["children_rss_mib"])
    return {
        **result,
        "tokens": tokens,
        "tokens_per_s": tokens / result["seconds"],
        "peak_rss_mib": peak,
        "bytes": manifest["bytes"],
        "bytes_per_token": manifest["bytes"] / kept,
        "dtype": manifest["dtype"],
    }


TRAIN = """
import json, sys, time
START = time.time()
from transformers import TrainerCallback
from moelpr.train import load_recipe, train

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            print(json.dumps({"seconds_to_step1": time.time() - START}), flush=True)

train(load_recipe(sys.argv[1], sys.argv[2:]), callbacks=[FirstStep()])
"""


def time_to_step1(model: Path, data: Path, out: Path) -> float:
    """A stage-1 run from the prepared data: seconds from process start (before any import) to step 1's end."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "stage1.yaml"
    overrides = ["--model", str(model), "--prepared", str(data), "--cutoff_len", str(CUTOFF)]
    overrides += [
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--overwrite",
        "true",
    ]
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(recipe), *overrides], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"seconds_to_step1"')]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"training from {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0])["seconds_to_step1"]


_T0 = time.perf_counter()


def _say(what: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        return _run(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        return _bare(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the corpora, datasets and model go")
    parser.add_argument("--small", action="store_true", help="8 and 32 MiB instead of 256 and 1,024 MiB")
    parser.add_argument("--sizes", help="the two corpus sizes in MiB, e.g. 2,8 (overrides --small)")
    parser.add_argument("--tokenizer-mb", type=int, default=None, help="text the tokenizer is trained on")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"tokenizer vocabulary (default {VOCAB:,}: int32 ids)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([8, 32] if args.small else [256, 1024])
    shard_mb = max(1, sizes[0] // 8)
    work = args.workdir
    results: dict = {"sizes_mib": sizes, "shard_mb": shard_mb, "cutoff_len": CUTOFF}
    specs = []
    for mb in sizes:
        root = work / f"corpus-{mb}"
        if not (root / "corpora.yaml").is_file():
            make_corpus(root, mb)
        specs.append(root / "corpora.yaml")
    _say("corpora made")
    model = work / "model"
    if not (model / "tokenizer.json").is_file():
        make_model(specs[0].parent, model, args.tokenizer_mb or min(64, sizes[0]), args.vocab)
    results["vocab_size"] = len(json.loads((model / "tokenizer.json").read_text())["model"]["vocab"])

    _say("tokenizer and model made")
    results["bare"] = bare_tokenizer(specs[0].parent, model)
    _say("bare tokenizer measured")
    runs = {}
    for name, spec, procs in (("small_1proc", specs[0], 1), ("small_2proc", specs[0], 2), ("large_2proc", specs[1], 2)):
        out = work / f"prepared-{name}"
        if out.exists():
            shutil.rmtree(out)
        runs[name] = prepare(spec, model, out, procs, shard_mb)
        _say(f"prepare {name}: {runs[name]['seconds']:.1f} s inside the process")
    results["prepare"] = runs
    results["step1_seconds"] = {}
    for size, name in (("small", "small_2proc"), ("large", "large_2proc")):
        results["step1_seconds"][size] = time_to_step1(model, work / f"prepared-{name}", work / f"train-{size}")
        _say(f"train from the {size} dataset")
    bare, one, two, large = results["bare"], runs["small_1proc"], runs["small_2proc"], runs["large_2proc"]
    lines = [
        f"corpora: {sizes[0]} and {sizes[1]} MiB of text ({one['tokens']:,} and {large['tokens']:,} tokens, "
        f"{large['tokens'] / one['tokens']:.2f}x); vocabulary {results['vocab_size']:,}; {shard_mb} MiB shards",
        f"bare tokenizer, 1 thread:      {bare['tokens_per_s']:>12,.0f} tokens/s",
        f"prepare, 1 process:            {one['tokens_per_s']:>12,.0f} tokens/s = "
        f"{one['tokens_per_s'] / bare['tokens_per_s']:.2f}x the bare tokenizer (goal >= 0.8)",
        f"prepare, 2 processes:          {two['tokens_per_s']:>12,.0f} tokens/s = "
        f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}x 1 process",
        f"peak RSS, 2 processes:         {two['peak_rss_mib']:.0f} MiB ({sizes[0]} MiB) / {large['peak_rss_mib']:.0f} MiB "
        f"({sizes[1]} MiB) = {large['peak_rss_mib'] / two['peak_rss_mib']:.2f}x (goal <= 1.15)",
        f"on disk:                       {large['bytes_per_token']:.3f} bytes per token, {large['dtype']} (goal <= 4.1)",
        f"train start to step 1:         {results['step1_seconds']['small']:.1f} s ({sizes[0]} MiB), "
        f"{results['step1_seconds']['large']:.1f} s ({sizes[1]} MiB) (goal < 30 s, not growing)",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
