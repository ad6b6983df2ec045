"""The pack's translation files as ComfyUI reads them: locales/<lang>/<name>.json, help pages in web/docs."""
import json
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
LOCALES = PACK_ROOT / "locales"
DOCS = PACK_ROOT / "web" / "docs"
LANGS = ("zh", "ja")


def load(lang: str, name: str) -> dict:
    path = LOCALES / lang / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a.b.c': value} for every non-dict value of a nested dict."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, path + "."))
        else:
            out[path] = value
    return out
