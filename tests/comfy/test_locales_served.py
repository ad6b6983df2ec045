"""The pack's zh/ja translations against a real ComfyUI (COMFYUI_PATH).

- Every node the pack's comfy_entrypoint registers, every input and output of what
  /object_info serves for it (GET_NODE_INFO_V1), its description, tooltips and category segments
  have an entry in each language, and no entry is left for something the schema no longer has.
- ComfyUI's own CustomNodeManager merges the files into what /i18n serves.
- The server serves the translated help pages where the frontend fetches them.
- slow, needs /usr/bin/chromium: the real frontend, with Comfy.Locale set to each language,
  shows workflows/apply_fera.json (and the pack's other workflows) with translated node titles,
  widget labels and socket names.
"""
import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT, pack_module, setup_comfy
from comfy_server import CHROMIUM, DIALOGS_JS, HTTP_TIMEOUT, PACK_DIR_NAME, WORKFLOW, WORKFLOWS, open_frontend
from locale_files import DOCS, LANGS, leaves, load

setup_comfy()


def i18n_key(name: str) -> str:
    """The frontend's normalizeI18nKey."""
    return name.replace(".", "_")


@pytest.fixture(scope="module")
def node_infos() -> dict[str, dict]:
    """{node_id: the /object_info entry} of every node the extension registers."""
    extension = asyncio.run(pack_module("nodes.extension").comfy_entrypoint())
    return {i18n_key(info["name"]): info
            for info in (n.GET_NODE_INFO_V1() for n in asyncio.run(extension.get_node_list()))}


def expected_keys(infos: dict[str, dict]) -> set[str]:
    """Every key the frontend looks up for these nodes (see tests/pack/test_locales.py for the layout)."""
    keys = set()
    for node_id, info in infos.items():
        node = f"nodeDefs.{node_id}"
        keys.add(f"{node}.display_name")
        if info.get("description"):
            keys.add(f"{node}.description")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                keys.add(f"{node}.inputs.{i18n_key(name)}.name")
                if len(spec) > 1 and spec[1].get("tooltip"):
                    keys.add(f"{node}.inputs.{i18n_key(name)}.tooltip")
        tooltips = info.get("output_tooltips") or []
        for index in range(len(info["output"])):
            keys.add(f"{node}.outputs.{index}.name")
            if index < len(tooltips) and tooltips[index]:
                keys.add(f"{node}.outputs.{index}.tooltip")
        keys.update(f"nodeCategories.{segment}" for segment in info["category"].split("/"))
    return keys


@pytest.mark.parametrize("lang", LANGS)
def test_every_node_input_and_output_is_translated(node_infos, lang):
    present = set(leaves({"nodeDefs": load(lang, "nodeDefs"), **load(lang, "main")}))
    expected = expected_keys(node_infos)
    assert not sorted(expected - present), f"{lang}: untranslated (falls back to English): {sorted(expected - present)}"
    assert not sorted(present - expected), f"{lang}: stale entries, not in the schema: {sorted(present - expected)}"
    for node_id in node_infos:
        assert (DOCS / node_id / f"{lang}.md").is_file(), f"no {lang} help page for {node_id}"


def test_comfyui_merges_the_pack_locales(tmp_path, monkeypatch):
    """ComfyUI's CustomNodeManager, reading a custom_nodes folder holding the pack, builds /i18n."""
    import folder_paths
    from app.custom_node_manager import CustomNodeManager
    (tmp_path / PACK_DIR_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(tmp_path)], set()))
    merged = CustomNodeManager().build_translations()
    for lang in LANGS:
        assert merged[lang]["nodeDefs"] == load(lang, "nodeDefs")
        assert merged[lang]["nodeCategories"] == load(lang, "main")["nodeCategories"]


def _fetch(srv, path: str) -> bytes:
    with urllib.request.urlopen(srv.url + path, timeout=HTTP_TIMEOUT) as r:
        return r.read()


def test_server_serves_translations_and_help_pages(server, node_infos):  # noqa: F811
    i18n = server.get("/i18n")
    for lang in LANGS:
        for node_id in node_infos:
            assert i18n[lang]["nodeDefs"][node_id] == load(lang, "nodeDefs")[node_id]
            page = (DOCS / node_id / f"{lang}.md").read_bytes()
            assert _fetch(server, f"/extensions/{PACK_DIR_NAME}/docs/{node_id}/{lang}.md") == page


# ---------------------------------------------------------------- real frontend (headless Chromium)

_GRAPH_JS = ("JSON.stringify(window.app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title, "
             "widgets: (n.widgets || []).map(w => [w.name, w.label ?? null]), "
             "inputs: (n.inputs || []).map(s => [s.name, s.label ?? s.localized_name ?? null, !!s.widget]), "
             "outputs: (n.outputs || []).map(s => [s.name, s.label ?? s.localized_name ?? null, s.type])})))")


def _frontend_view(srv, lang: str, workflows: list[Path]) -> dict[str, list[dict]]:
    """Per workflow, the titles, widget labels and socket labels of its nodes as the frontend shows them in `lang`."""
    assert srv.post("/settings/Comfy.Locale", lang)[0] == 200
    title = json.dumps(load(lang, "nodeDefs")["ApplyFeRA"]["display_name"])
    browser = open_frontend(srv)
    views = {}
    try:
        try:  # the node definitions are registered once the pack's locale has been merged
            browser.wait_for(f"window.LiteGraph.registered_node_types['ApplyFeRA'].title === {title}", timeout=60)
        except TimeoutError:
            seen = browser.eval("window.LiteGraph.registered_node_types['ApplyFeRA'].title")
            pytest.fail(f"{lang}: the frontend registered ApplyFeRA as {seen!r}, not {title}")
        registered = set(browser.eval("Object.keys(window.LiteGraph.registered_node_types)"))
        for path in workflows:
            wf = json.loads(path.read_text())
            absent = sorted({n["type"] for n in wf["nodes"]} - registered)
            assert not absent, f"{lang}, {path.name}: node types unknown to the frontend: {absent}"
            browser.eval(f"window.app.loadGraphData({json.dumps(wf)})")
            browser.wait_for(f"window.app.graph.nodes.length === {len(wf['nodes'])}", timeout=60)
            time.sleep(1.0)
            assert not browser.eval(DIALOGS_JS), (path.name, browser.eval(DIALOGS_JS))
            shot = Path(tempfile.gettempdir()) / f"fera-frontend-{lang}-{path.stem}-{srv.port}.png"
            browser.screenshot(shot)
            titled = {n["id"] for n in wf["nodes"] if n.get("title")}  # a title the workflow gives is not translated
            views[f"{path.name} (screenshot {shot})"] = [dict(n, own_title=n["id"] in titled)
                                                         for n in json.loads(browser.eval(_GRAPH_JS))]
        return views
    finally:
        browser.close()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
def test_frontend_shows_the_workflows_translated(server, node_infos):  # noqa: F811
    """workflows/apply_fera.json first, then the pack's other workflows (their nodes too)."""
    workflows = [WORKFLOW] + [p for p in WORKFLOWS if p != WORKFLOW]
    try:
        for lang in LANGS:
            defs = load(lang, "nodeDefs")
            for name, nodes in _frontend_view(server, lang, workflows).items():
                print(f"\n{lang}, {name}:")
                for node in (n for n in nodes if n["type"] in defs):
                    _check_node(lang, node, defs[node["type"]], node_infos[node["type"]])
    finally:
        server.post("/settings/Comfy.Locale", "en")


def _check_node(lang: str, node: dict, tr: dict, info: dict):
    sockets = [s[:2] for s in node["inputs"] if not s[2]]
    print(f"  {node['type']}: title {node['title']!r}, widgets {node['widgets']}, "
          f"sockets {sockets}, outputs {[s[:2] for s in node['outputs']]}")
    assert node["own_title"] or node["title"] == tr["display_name"], (lang, node["type"], node["title"])
    inputs = {*info["input"].get("required", {}), *info["input"].get("optional", {})}
    for name, label in node["widgets"]:
        if name in inputs:  # not the frontend's own widgets (a seed's control_after_generate, a chart)
            assert label == tr["inputs"][name]["name"], (lang, node["type"], name, label)
    for name, label, is_widget in node["inputs"]:
        if not is_widget:
            assert label == tr["inputs"][name]["name"], (lang, node["type"], name, label)
    for index, (name, label, typ) in enumerate(node["outputs"]):
        # The frontend names an output after its type (its own dataTypes entry) when the two agree.
        if name != typ:
            assert label == tr["outputs"][str(index)]["name"], (lang, node["type"], index, label)
