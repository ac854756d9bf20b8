"""The LibreOffice-help corpus builder on a fake help tree written here: markup stripped to prose, the language
filter, and the split by page across languages (a page and its translations in one split, no test paragraph in
training); plus one run on the unpacked Debian packages where scripts/install_corpora.sh has put them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moelpr.demo.libreoffice import HELP_SOURCES, build_libreoffice_corpus, help_root, page_paragraphs
from moelpr.errors import UserError

EN = [
    "Choose this command to open a dialog where you can change the settings of the selected table.",
    "The document is saved automatically every ten minutes, so you do not lose your work after a crash.",
    "You can insert a picture from a file, and then move it anywhere on the page with the mouse.",
    "When the spelling check is running, every unknown word in the text is marked with a red wavy line.",
    "The formula is calculated again whenever one of the cells it refers to is changed by the user.",
    "Select the paragraph first, and then choose the font, the size and the colour of the letters.",
    "A template keeps the styles of your documents, so that every new letter looks the same.",
    "If the printer is not listed here, ask your administrator to install the right driver for it.",
    "The presentation starts from the first slide when you press the key shown at the top of the window.",
    "Comments written by other people are shown in the margin next to the lines they belong to.",
]
HU = [
    "Válassza ezt a parancsot, hogy megnyisson egy párbeszédablakot, ahol a kijelölt táblázat beállításait "
    "módosíthatja.",
    "A dokumentum tíz percenként automatikusan mentésre kerül, így egy összeomlás után sem veszíti el a munkáját.",
    "Beszúrhat egy képet egy fájlból, majd az egérrel bárhová áthelyezheti az oldalon.",
    "Amikor a helyesírás-ellenőrzés fut, a szövegben minden ismeretlen szót piros hullámos vonal jelöl.",
    "A képlet mindig újra kiszámításra kerül, amikor a felhasználó megváltoztatja valamelyik cellát, amelyre "
    "hivatkozik.",
    "Először jelölje ki a bekezdést, majd válassza ki a betűk típusát, méretét és színét.",
    "A sablon megőrzi a dokumentumok stílusait, így minden új levél ugyanúgy néz ki.",
    "Ha a nyomtató nem szerepel ebben a listában, kérje meg a rendszergazdát, hogy telepítse hozzá a megfelelő "
    "illesztőprogramot.",
    "A bemutató az első diától indul, amikor megnyomja az ablak tetején látható billentyűt.",
    "A mások által írt megjegyzések a margón jelennek meg, azok mellett a sorok mellett, amelyekhez tartoznak.",
]
EL = [
    "Επιλέξτε αυτή την εντολή για να ανοίξετε ένα παράθυρο διαλόγου όπου μπορείτε να αλλάξετε τις ρυθμίσεις του "
    "επιλεγμένου πίνακα.",
    "Το έγγραφο αποθηκεύεται αυτόματα κάθε δέκα λεπτά, ώστε να μη χάσετε τη δουλειά σας μετά από μια κατάρρευση.",
    "Μπορείτε να εισαγάγετε μια εικόνα από ένα αρχείο και μετά να τη μετακινήσετε οπουδήποτε στη σελίδα με το ποντίκι.",
    "Όταν εκτελείται ο ορθογραφικός έλεγχος, κάθε άγνωστη λέξη στο κείμενο σημειώνεται με μια κόκκινη κυματιστή "
    "γραμμή.",
    "Ο τύπος υπολογίζεται ξανά κάθε φορά που ο χρήστης αλλάζει ένα από τα κελιά στα οποία αναφέρεται.",
    "Επιλέξτε πρώτα την παράγραφο και έπειτα διαλέξτε τη γραμματοσειρά, το μέγεθος και το χρώμα των γραμμάτων.",
    "Ένα πρότυπο κρατά τις μορφοποιήσεις των εγγράφων σας, ώστε κάθε νέα επιστολή να φαίνεται ίδια.",
    "Αν ο εκτυπωτής δεν εμφανίζεται εδώ, ζητήστε από τον διαχειριστή σας να εγκαταστήσει το σωστό πρόγραμμα οδήγησης.",
    "Η παρουσίαση ξεκινά από την πρώτη διαφάνεια όταν πατήσετε το πλήκτρο που εμφανίζεται στο πάνω μέρος του "
    "παραθύρου.",
    "Τα σχόλια που έγραψαν άλλοι εμφανίζονται στο περιθώριο δίπλα στις γραμμές στις οποίες ανήκουν.",
]
EMBEDDED = {  # a help section embedded in every page, translated
    "en": "Security settings stored in a document are ignored when it is opened, for the safety of your computer.",
    "hu": "A dokumentumban tárolt biztonsági beállításokat a program megnyitáskor figyelmen kívül hagyja, "
    "a számítógép védelmében.",
    "el": "Οι ρυθμίσεις ασφαλείας που είναι αποθηκευμένες σε ένα έγγραφο αγνοούνται κατά το άνοιγμα, για την "
    "ασφάλεια του υπολογιστή σας.",
}
UNTRANSLATED = "This sentence was never translated, so it still appears in English inside the Hungarian help page."
SENTENCES = {"en": EN, "hu": HU, "el": EL}
DIRS = {"en": "en-US", "hu": "hu", "el": "el"}
PAGES = 10


def _html(lang: str, i: int) -> str:
    s = SENTENCES[lang]
    extra = f'<p class="paragraph">{UNTRANSLATED}</p>' if lang == "hu" and i == 2 else ""
    return f"""<!DOCTYPE html><html lang="{DIRS[lang]}"><head><title>Page {i}</title>
<script type="text/javascript" src="help.js"></script></head><body>
<header><p>LibreOffice 7.4 Help navigation that is not part of the page text at all</p></header>
<div id="DisplayArea" itemprop="softwareHelp">
<h1 id="hd_1">A heading that is long enough to pass the length filter but is a heading</h1>
<p id="par_1" class="paragraph" dir="auto"><span class="avis">{s[i]}</span></p>
<p id="par_2" class="paragraph">{s[(i + 3) % PAGES]}
  {s[(i + 5) % PAGES]}</p>
{extra}
<div class="embedded"><p class="embedded">{EMBEDDED[lang]}</p></div>
<p class="code">Dim aPicker As com.sun.star.ui.dialogs.XFilePicker set to the picker object of this dialog</p>
<pre><code>Sub Main: MsgBox "a code block that must never reach the corpus text" : End Sub</code></pre>
<div class="howtoget"><p class="embedded">Choose Tools - Options - LibreOffice Writer - General settings page</p></div>
</div>
<footer><p>Help content debug info: this page is text/shared/page{i}.xhp and nothing else</p></footer>
</body></html>"""


@pytest.fixture()
def help_tree(tmp_path: Path) -> Path:
    root = tmp_path / "help"
    for lang, folder in DIRS.items():
        for i in range(PAGES):
            page = root / folder / "text" / "shared" / f"page{i}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(_html(lang, i), encoding="utf-8")
    return root


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_page_paragraphs_strip_markup_and_keep_the_default_variant():
    html = """<html><body><div id="DisplayArea"><h2>Options</h2>
    <p class="paragraph">Choose <span class="switchinline"><span hidden="true" id="MACx" class="MAC">LibreOffice -
    Preferences</span><span hidden="true" id="defaultx">Tools - Options</span></span> to set the
    <span class="emph">default</span> paper size &amp; margins.<br>Then close it.</p>
    <p class="code">x = 1</p><pre>code</pre>
    <p class="paragraph">这是 一个
    测试</p></div><p>outside</p></body></html>"""
    assert page_paragraphs(html) == [
        "Choose Tools - Options to set the default paper size & margins. Then close it.",
        "这是一个测试",
    ]


def test_split_by_page_across_languages_and_the_language_filter(help_tree: Path, tmp_path: Path):
    out = tmp_path / "corpus"
    corpora = build_libreoffice_corpus(
        out,
        languages_old=("en",),
        languages_new=("hu", "el"),
        root=help_tree,
        heldout_fraction=0.2,
        validation_fraction=0.2,
        workers=1,
    )
    spec = yaml.safe_load(corpora.read_text())
    assert [(e["language"], e["role"]) for e in spec] == [("en", "old"), ("hu", "new"), ("el", "new")]
    splits = {
        lang: {split: _docs(out / split / f"{lang}.jsonl") for split in ("train", "validation", "heldout")}
        for lang in DIRS
    }
    # every page, identified by its first sentence, sits in the same split in every language
    where = {}
    for lang, by_split in splits.items():
        for split, docs in by_split.items():
            for doc in docs:
                page = next(i for i, s in enumerate(SENTENCES[lang]) if doc.startswith(s))
                where.setdefault(page, {})[lang] = split
    assert sorted(where) == list(range(PAGES))
    assert all(len(set(langs.values())) == 1 and len(langs) == 3 for langs in where.values()), where
    assert {split for langs in where.values() for split in langs.values()} == {"train", "validation", "heldout"}
    for lang, by_split in splits.items():
        text = {split: "\n\n".join(docs).split("\n\n") for split, docs in by_split.items()}
        assert not set(text["heldout"]) & set(text["train"]) and not set(text["validation"]) & set(text["train"])
        everything = [p for paragraphs in text.values() for p in paragraphs]
        assert everything.count(EMBEDDED[lang]) == 1 and EMBEDDED[lang] in text["heldout"]  # kept in a test page
        assert not any(
            "heading" in p or "Dim aPicker" in p or "MsgBox" in p or "Tools - Options" in p for p in everything
        )
        assert not any("navigation" in p or "debug info" in p for p in everything)
    hu = "\n\n".join(d for docs in splits["hu"].values() for d in docs)
    stats = json.loads((out / "corpus_stats.json").read_text())
    assert UNTRANSLATED not in hu and stats["languages"]["hu"]["paragraphs_wrong_language"] == 1
    assert stats["languages"]["en"]["paragraphs_wrong_language"] == 0
    assert stats["languages"]["el"]["pages"] == PAGES and stats["pages"]["heldout"] >= 1

    again = build_libreoffice_corpus(
        tmp_path / "again",
        languages_old=("en",),
        languages_new=("hu", "el"),
        root=help_tree,
        heldout_fraction=0.2,
        validation_fraction=0.2,
        workers=2,
    )
    for split in ("train", "heldout"):
        assert (again.parent / split / "hu.jsonl").read_bytes() == (out / split / "hu.jsonl").read_bytes()


def test_page_sample_is_the_same_in_every_language(help_tree: Path, tmp_path: Path):
    out = tmp_path / "sample"
    build_libreoffice_corpus(out, languages_old=("en",), languages_new=("el",), root=help_tree, max_pages=4, workers=1)
    pages = {
        lang: {
            next(i for i, s in enumerate(SENTENCES[lang]) if doc.startswith(s))
            for split in ("train", "validation", "heldout")
            for doc in _docs(out / split / f"{lang}.jsonl")
        }
        for lang in ("en", "el")
    }
    assert len(pages["en"]) == 4 and pages["en"] == pages["el"]


def test_bad_input_is_a_user_error(help_tree: Path, tmp_path: Path, monkeypatch):
    with pytest.raises(UserError, match="unknown demo language 'uk'"):
        build_libreoffice_corpus(tmp_path / "a", languages_old=("en",), languages_new=("uk",), root=help_tree)
    with pytest.raises(UserError, match=r"no LibreOffice help pages for language 'tr'.*install_corpora\.sh"):
        build_libreoffice_corpus(tmp_path / "b", languages_old=("en",), languages_new=("tr",), root=help_tree)
    assert not (tmp_path / "b").exists()
    monkeypatch.setenv("MOELPR_LIBREOFFICE_HELP", str(help_tree))
    assert help_root() == help_tree


@pytest.mark.skipif(
    not all((help_root() / folder / "text").is_dir() for _, folder in HELP_SOURCES.values()),
    reason="needs the LibreOffice help: bash scripts/install_corpora.sh",
)
def test_build_from_the_unpacked_packages(tmp_path: Path):
    corpora = build_libreoffice_corpus(tmp_path / "real", max_pages=40, seed=1, workers=1)
    stats = json.loads((corpora.parent / "corpus_stats.json").read_text())["languages"]
    assert list(stats) == ["en", "es", "zh", "el", "hu", "tr"]
    for lang, s in stats.items():
        assert s["paragraphs_kept"] > 0 and s["train_docs"] >= 1, (lang, s)
    el = " ".join(_docs(corpora.parent / "train/el.jsonl"))
    zh = " ".join(_docs(corpora.parent / "train/zh.jsonl"))
    assert sum("α" <= c <= "ω" for c in el) > len(el) / 3  # Greek
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > len(zh) / 4  # Han characters
