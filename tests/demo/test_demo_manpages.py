"""The man-page corpus builder (`--corpus manpages`), on a fake man tree written here (plus one run on the real packages)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moelpr.demo.corpus import clean, is_prose
from moelpr.demo.manpages import MANPAGE_SOURCES, build_manpage_corpus, extract_paragraphs, list_manpages, render
from moelpr.errors import UserError

HAS_RENDERER = bool(shutil.which("mandoc") or shutil.which("man"))
needs_renderer = pytest.mark.skipif(not HAS_RENDERER, reason="needs mandoc or man (bash scripts/install_corpora.sh)")

EN = [
    "The program reads the configuration file at startup and stops with an error when a value is invalid.",
    "Every user who wants to share files with the group must first ask the administrator for permission.",
    "When the network connection is lost, the daemon waits a few seconds and then tries again quietly.",
    "This manual page describes the options that control how the archive is written to the disk.",
    "The library keeps a small cache of recently used names so that repeated lookups are much faster.",
    "If the environment variable is not set, the default directory in the home folder is used instead.",
    "Signals sent to the process while it is sleeping are delivered as soon as the call returns.",
    "Messages are written to the system log, and only serious problems are also shown on the screen.",
]
TR = [
    "Bu program yapılandırma dosyasını açılışta okur ve geçersiz bir değer bulursa hata vererek durur.",
    "Dosyaları grupla paylaşmak isteyen her kullanıcı önce yöneticiden izin istemek zorundadır.",
    "Ağ bağlantısı koptuğunda artalan süreci birkaç saniye bekler ve sonra sessizce yeniden dener.",
    "Bu kılavuz sayfası, arşivin diske nasıl yazılacağını denetleyen seçenekleri açıklamaktadır.",
    "Kütüphane, son kullanılan isimlerin küçük bir önbelleğini tutar, böylece tekrarlanan aramalar hızlanır.",
    "Ortam değişkeni tanımlanmamışsa, bunun yerine ev dizinindeki öntanımlı klasör kullanılır.",
    "Süreç uyurken ona gönderilen sinyaller, çağrı döner dönmez hemen teslim edilir.",
    "İletiler sistem günlüğüne yazılır ve yalnızca ciddi sorunlar ayrıca ekranda gösterilir.",
]
WRONG = "This paragraph was never translated, so it is still written in plain English in the Turkish page."
SHARED = "Bu paragraf iki ayrı sayfada birebir aynı biçimde geçer ve derlemede yalnızca bir kez kalmalıdır."


def _roff(title: str, paragraphs: list[str]) -> str:
    body = "\n".join(f".PP\n{p}" for p in paragraphs)
    return (
        f'.TH {title.upper()} 1 "2024" "fake 1.0" "Fake Manual"\n.SH NAME\n{title} \\- a fake page\n'
        f".SH SYNOPSIS\n.B {title}\n[\\fB\\-v\\fR] [\\fB\\-o\\fR \\fIfile\\fR]\n.SH DESCRIPTION\n{body}\n"
        ".SH OPTIONS\n.TP\n.B \\-v\nshow\n.TP\n.B \\-o\nout\n"
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()))


@pytest.fixture()
def man_root(tmp_path: Path) -> Path:
    """en and tr trees of 8 pages each; tr page 0 holds an English paragraph, pages 1 and 2 a shared one."""
    root = tmp_path / "man"
    for i in range(8):
        name = f"tool{i}"
        _write(root / "man1" / f"{name}.1.gz", _roff(name, [EN[i], f"{EN[(i + 1) % 8]} {EN[(i + 2) % 8]}"]))
        tr = [TR[i], f"{TR[(i + 1) % 8]} {TR[(i + 2) % 8]}"]
        tr += ([WRONG] if i == 0 else []) + ([SHARED] if i in (1, 2) else [])
        _write(root / "tr" / "man1" / f"{name}.1.gz", _roff(name, tr))
    _write(root / "man1" / "alias.1.gz", ".so man1/tool0.1\n")  # a redirect stub: skipped
    (root / "man1" / "link.1.gz").symlink_to("tool1.1.gz")  # an alias: skipped
    return root


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_list_manpages_skips_links_and_other_trees(man_root: Path) -> None:
    en = list_manpages("en", man_root)
    assert [p.name for p in en][:2] == ["man1/alias.1", "man1/tool0.1"]  # the .so stub is dropped when read
    assert len(en) == 9 and all("tr" not in p.path.parts for p in en)
    assert len(list_manpages("tr", man_root)) == 8


def test_extract_paragraphs_joins_wrapped_lines_and_drops_headings() -> None:
    long = "word " * 190  # 7 + 950 columns: near the 1000-column limit, so the next line continues it
    rendered = "\n".join(
        [
            "TOOL(1)        General Commands Manual        TOOL(1)",
            "",
            "NAME",
            "       tool - fake",
            "",
            "DESCRIPTION",
            "       " + long.strip(),
            "       end of the wrapped paragraph.",
            "       A separate line.",
            "",
            "       -v, --verbose   Explain what is being done.",
            "",
            "fake 1.0        2024        TOOL(1)",
        ]
    )
    paragraphs = extract_paragraphs(rendered)
    assert paragraphs[0] == "tool - fake"
    assert paragraphs[1].endswith("word end of the wrapped paragraph.") and paragraphs[2] == "A separate line."
    assert paragraphs[3] == "Explain what is being done."  # the option tag is dropped
    assert not any("TOOL(1)" in p or p == "DESCRIPTION" for p in paragraphs)


def test_is_prose_and_clean() -> None:
    assert is_prose(EN[0]) and is_prose(TR[0])
    assert not is_prose("-c, --count")
    assert not is_prose('int main(int argc, char **argv) { return printf("%d\\n", argc); }')
    assert not is_prose("320   208   D0   Đ   LATIN CAPITAL LETTER D WITH STROKE")
    assert is_prose("校验和按照描述的方式进行计算在校验过程中其输入内容应当")  # 26 CJK characters = 52 columns
    assert clean("这是 一个  测试 of  text") == "这是一个测试 of text"


@needs_renderer
@pytest.mark.parametrize("workers", [1, 2])
def test_build_fake_corpus(man_root: Path, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "corpus"
    corpora = build_manpage_corpus(
        out,
        languages_old=("en",),
        languages_new=("tr",),
        man_root=man_root,
        heldout_fraction=0.25,
        workers=workers,
    )
    assert corpora == out / "corpora.yaml"
    train_spec = yaml.safe_load(corpora.read_text())
    held_spec = yaml.safe_load((out / "heldout.yaml").read_text())
    roles = [(e["language"], e["role"], e["text_column"]) for e in train_spec]
    assert roles == [("en", "old", "text"), ("tr", "new", "text")]
    assert [e["path"] for e in held_spec] == ["heldout/en.jsonl", "heldout/tr.jsonl"]  # relative to the yaml

    stats = json.loads((out / "corpus_stats.json").read_text())["languages"]
    for lang, sentences in (("en", EN), ("tr", TR)):
        train, held = _docs(out / "train" / f"{lang}.jsonl"), _docs(out / "heldout" / f"{lang}.jsonl")
        assert train and held and not set(train) & set(held)  # split by document, disjoint
        assert len(train) + len(held) == stats[lang]["docs"] == 8
        paragraphs = "\n\n".join(train + held).split("\n\n")
        assert all(paragraphs.count(s) == 1 for s in sentences)  # every paragraph kept, once
        assert stats[lang]["train_docs"] == len(train) and stats[lang]["heldout_docs"] == len(held)
    tr_text = "\n\n".join(_docs(out / "train/tr.jsonl") + _docs(out / "heldout/tr.jsonl"))
    assert WRONG not in tr_text and stats["tr"]["paragraphs_wrong_language"] >= 1  # language ID filter
    assert tr_text.count(SHARED) == 1 and stats["tr"]["paragraphs_duplicate"] == 1  # exact dedup
    assert stats["en"]["pages"] == 8  # the .so stub and the symlink are not pages
    assert stats["en"]["paragraphs_short_or_code"] > 0  # NAME lines, synopses, option tags

    again = build_manpage_corpus(
        tmp_path / "again",
        languages_old=("en",),
        languages_new=("tr",),
        man_root=man_root,
        heldout_fraction=0.25,
        workers=1,
    )
    assert (again.parent / "train/tr.jsonl").read_bytes() == (out / "train/tr.jsonl").read_bytes()


@needs_renderer
def test_validation_split_is_disjoint_and_keeps_the_test_pages(man_root: Path, tmp_path: Path) -> None:
    kw = {
        "languages_old": ("en",),
        "languages_new": ("tr",),
        "man_root": man_root,
        "heldout_fraction": 0.25,
        "workers": 1,
    }
    without = build_manpage_corpus(tmp_path / "without", **kw).parent
    with_val = build_manpage_corpus(tmp_path / "with", validation_fraction=0.25, **kw).parent
    assert not (without / "validation.yaml").exists()
    spec = yaml.safe_load((with_val / "validation.yaml").read_text())
    assert [(e["language"], e["role"], e["path"]) for e in spec] == [
        ("en", "old", "validation/en.jsonl"),
        ("tr", "new", "validation/tr.jsonl"),
    ]
    for lang in ("en", "tr"):
        splits = {split: _docs(with_val / split / f"{lang}.jsonl") for split in ("train", "validation", "heldout")}
        assert all(splits.values())
        assert not (
            set(splits["train"]) & set(splits["validation"])
            or set(splits["train"]) & set(splits["heldout"])
            or set(splits["validation"]) & set(splits["heldout"])
        )
        assert sum(map(len, splits.values())) == 8
        assert splits["heldout"] == _docs(without / "heldout" / f"{lang}.jsonl")  # test pages do not move
    with pytest.raises(UserError, match="leave training text"):
        build_manpage_corpus(tmp_path / "bad", validation_fraction=0.8, **kw)


@pytest.mark.skipif(not (shutil.which("mandoc") and shutil.which("man")), reason="needs mandoc and man")
def test_renderers_agree() -> None:
    paragraphs = [EN[0], TR[0], "Çince: 守护进程在启动时读取配置文件，如果某个值无效就会报错。"]
    source = _roff("tool", paragraphs).encode()
    by_renderer = [[clean(p) for p in extract_paragraphs(render(source, r)) if is_prose(p)] for r in ("mandoc", "man")]
    assert by_renderer[0] == by_renderer[1] == paragraphs


@needs_renderer
def test_build_caps_characters(man_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "capped"
    build_manpage_corpus(
        out,
        languages_old=("en",),
        languages_new=("tr",),
        man_root=man_root,
        max_chars_per_language=300,
        max_docs_per_language=5,
        workers=1,
    )
    stats = json.loads((out / "corpus_stats.json").read_text())["languages"]
    assert all(s["train_chars"] <= 300 and s["docs"] <= 5 for s in stats.values())


def test_bad_input_is_a_user_error(man_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown demo language 'xx'; supported: en, es, zh"):
        build_manpage_corpus(tmp_path / "a", languages_old=("en",), languages_new=("xx",), man_root=man_root)
    with pytest.raises(UserError, match="once"):
        build_manpage_corpus(tmp_path / "b", languages_old=("en",), languages_new=("en",), man_root=man_root)
    if HAS_RENDERER:
        with pytest.raises(UserError, match=r"no man pages found for language 'hu'.*install_corpora\.sh"):
            build_manpage_corpus(tmp_path / "c", languages_old=("en",), languages_new=("hu",), man_root=man_root)
    with pytest.raises(UserError, match="unknown renderer"):
        build_manpage_corpus(
            tmp_path / "d", languages_old=("en",), languages_new=("tr",), man_root=man_root, renderer="troff"
        )
    assert not (tmp_path / "c").exists()


def _installed(package: str) -> bool:
    if not shutil.which("dpkg-query"):
        return False
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.stdout.endswith("installed") and "not-installed" not in proc.stdout


ALL_INSTALLED = HAS_RENDERER and all(_installed(pkg) for pkg, _ in MANPAGE_SOURCES.values())


@pytest.mark.skipif(not ALL_INSTALLED, reason="needs the man-page packages: bash scripts/install_corpora.sh")
def test_build_from_installed_packages(tmp_path: Path) -> None:
    corpora = build_manpage_corpus(tmp_path / "real", max_docs_per_language=6, seed=1)
    stats = json.loads((corpora.parent / "corpus_stats.json").read_text())["languages"]
    assert list(stats) == ["en", "es", "zh", "tr", "hu", "uk"]
    for lang, s in stats.items():
        assert s["paragraphs_kept"] > 0 and s["train_docs"] >= 1, (lang, s)
    uk = " ".join(_docs(corpora.parent / "train/uk.jsonl"))
    zh = " ".join(_docs(corpora.parent / "train/zh.jsonl"))
    assert sum("а" <= c <= "я" for c in uk) > len(uk) / 3  # Cyrillic
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > len(zh) / 4  # Han characters
