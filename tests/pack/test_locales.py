"""The pack's translations (locales/<lang>/, web/docs/<NodeId>/<lang>.md) without ComfyUI.

Layout, as ComfyUI 0.3.64 and 0.33.0 read it: the server's /i18n merges each custom node's
locales/<lang>/main.json with nodeDefs.json, commands.json and settings.json stored under those
file names as keys (app/custom_node_manager.py), and the frontend (1.27, 1.49) looks up
nodeDefs.<NodeId>.{display_name, description, inputs.<name>.{name, tooltip},
outputs.<index>.{name, tooltip}} and nodeCategories.<category segment>, with '.' in a key
replaced by '_'. Help pages: /extensions/<pack>/docs/<NodeId>/<locale>.md first, then
<NodeId>.md. The messages go through vue-i18n, whose message syntax gives {, }, @ and | a
meaning. Whether every node, input and output of the live schema is covered is checked
against ComfyUI in tests/comfy/test_locales_served.py; here the files themselves.
"""
import re

import pytest

from locale_files import DOCS, LANGS, LOCALES, leaves, load

EXTRA_FILES = ("nodeDefs", "commands", "settings")  # merged into main.json under these keys
NODE_KEYS = {"display_name", "description", "inputs", "outputs"}
SLOT_KEYS = {"name", "tooltip"}
# Characters a translation into the language must contain (a copied English string has none);
# zh must not contain kana (a Japanese string pasted into the Chinese file).
SCRIPT = {"zh": re.compile(r"[\u4e00-\u9fff]"), "ja": re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")}
KANA = re.compile(r"[\u3040-\u30ff]")
VUE_I18N_SYNTAX = re.compile(r"[{}@|]")
# Terms ComfyUI's own zh/ja locales leave in English (e.g. zh "Latent"), and method names: allowed as whole names.
KEPT_TERMS = {"Latent", "LoRA", "CLIP", "VAE", "Diff-Tuning"}


def english_node_ids() -> set[str]:
    """Nodes with an English help page (tests/comfy/test_adapter_nodes.py requires one for every node)."""
    return {p.stem for p in DOCS.glob("*.md")}


def test_every_language_has_node_translations():
    assert set(LANGS) <= {p.name for p in LOCALES.iterdir() if p.is_dir()}
    for lang in LANGS:
        assert load(lang, "nodeDefs"), f"locales/{lang}/nodeDefs.json is missing or empty"
        assert load(lang, "main").get("nodeCategories"), f"locales/{lang}/main.json has no nodeCategories"


@pytest.mark.parametrize("lang", LANGS)
def test_files_have_the_structure_the_frontend_reads(lang):
    main = load(lang, "main")
    assert not set(main) & set(EXTRA_FILES), "the server replaces these main.json keys by their own files"
    assert set(main) <= {"nodeCategories"}, f"unexpected sections in main.json: {sorted(main)}"
    assert all(isinstance(v, str) for v in main["nodeCategories"].values())
    for node_id, node in load(lang, "nodeDefs").items():
        assert "." not in node_id, f"{node_id}: the frontend looks keys up with '.' replaced by '_'"
        assert set(node) <= NODE_KEYS and "display_name" in node, (node_id, sorted(node))
        for name, slot in node.get("inputs", {}).items():
            assert "." not in name and set(slot) <= SLOT_KEYS and slot, (node_id, name, slot)
        for index, slot in node.get("outputs", {}).items():
            assert index.isdigit() and set(slot) <= SLOT_KEYS and slot, (node_id, index, slot)
    for path, text in leaves({**main, "nodeDefs": load(lang, "nodeDefs")}).items():
        assert isinstance(text, str) and text == text.strip() and text, f"{lang}: {path} = {text!r}"
        assert not VUE_I18N_SYNTAX.search(text), f"{lang}: {path} uses vue-i18n message syntax: {text!r}"
        if path.startswith("nodeDefs.") and text not in KEPT_TERMS:
            assert SCRIPT[lang].search(text), f"{lang}: {path} is not translated: {text!r}"
            assert lang != "zh" or not KANA.search(text), f"zh: {path} contains kana: {text!r}"


def test_languages_translate_the_same_keys():
    zh, ja = ({**load(lang, "main"), "nodeDefs": load(lang, "nodeDefs")} for lang in LANGS)
    only_zh, only_ja = sorted(set(leaves(zh)) - set(leaves(ja))), sorted(set(leaves(ja)) - set(leaves(zh)))
    assert not only_zh and not only_ja, f"only in zh: {only_zh}; only in ja: {only_ja}"


def test_translated_nodes_are_the_documented_nodes():
    for lang in LANGS:
        assert set(load(lang, "nodeDefs")) == english_node_ids(), lang


@pytest.mark.parametrize("lang", LANGS)
def test_help_pages_are_translated_section_by_section(lang):
    """One page per node and language, with the English page's headings and list items."""
    pages = {p.parent.name for p in DOCS.glob(f"*/{lang}.md")}
    assert pages == english_node_ids(), f"{lang} help pages: {sorted(pages ^ english_node_ids())}"
    for node_id in sorted(pages):
        english = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
        page = (DOCS / node_id / f"{lang}.md").read_text(encoding="utf-8")
        for marker in (r"^#+ ", r"^\s*[-*] "):
            count = lambda text: len(re.findall(marker, text, re.M))  # noqa: E731
            assert count(page) == count(english), f"{node_id}/{lang}.md: {marker} {count(page)} vs {count(english)}"
        assert SCRIPT[lang].search(page) and (lang != "zh" or not KANA.search(page)), f"{node_id}/{lang}.md"
