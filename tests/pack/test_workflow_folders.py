"""The pack's workflows reach ComfyUI's Templates browser, and nothing else shadows them (no ComfyUI).

ComfyUI lists a pack's templates from every folder named below, but serves them from the first
that exists only (app/custom_node_manager.py): a folder of another name earlier in the list
hides workflows/ (an `examples/` folder holding an adapter file once did).
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")  # ComfyUI's order


def template_folder_problems(root: Path) -> list[str]:
    """What would keep ComfyUI from serving root/workflows/*.json as the pack's templates."""
    present = [name for name in TEMPLATE_FOLDERS if (root / name).exists()]
    problems = [] if present == ["workflows"] else [
        f"template folders present: {present}; ComfyUI serves only the first, so keep exactly 'workflows'"]
    for name in present:
        for path in sorted((root / name).rglob("*")):
            rel = path.relative_to(root)
            if path.is_dir() or path.suffix != ".json" or path.parent != root / name:
                problems.append(f"{rel}: not a workflow JSON file directly in {name}/")
                continue
            try:
                wf = json.loads(path.read_text())
            except ValueError as err:
                problems.append(f"{rel}: not JSON ({err})")
                continue
            if not (isinstance(wf, dict) and isinstance(wf.get("nodes"), list)
                    and isinstance(wf.get("links"), list) and "version" in wf):
                problems.append(f"{rel}: not a UI-format workflow (nodes, links, version)")
    return problems


def test_only_workflows_holds_templates_and_only_workflow_json():
    assert not template_folder_problems(PACK_ROOT)
    assert list((PACK_ROOT / "workflows").glob("*.json")), "no workflow in workflows/"


@pytest.mark.parametrize("plant, problem", [
    ({"examples/tiny_reference.safetensors": "x"}, "template folders present: ['examples', 'workflows']"),
    ({"example_workflows/apply.json": "{}"}, "template folders present"),
    ({"workflows/notes.txt": "x"}, "workflows/notes.txt: not a workflow JSON file"),
    ({"workflows/old/apply.json": "{}"}, "workflows/old: not a workflow JSON file"),
    ({"workflows/broken.json": "{"}, "workflows/broken.json: not JSON"),
    ({"workflows/api_prompt.json": '{"3": {"class_type": "KSampler"}}'}, "not a UI-format workflow"),
])
def test_folder_check_sees_what_would_shadow_or_pollute_templates(tmp_path, plant, problem):
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "ok.json").write_text('{"nodes": [], "links": [], "version": 0.4}')
    assert not template_folder_problems(tmp_path)
    for rel, text in plant.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = template_folder_problems(tmp_path)
    assert any(problem in p for p in problems), problems


def test_readme_info_command_runs_on_the_shipped_example():
    """The README's info command reads the example adapter where the pack ships it."""
    readme = (PACK_ROOT / "README.md").read_text()
    command = re.search(r"python -m fera_core info ([^\s`]+)", readme)
    assert command, "README has no `python -m fera_core info FILE` command"
    args = shlex.split(command.group(0))[1:]
    assert (PACK_ROOT / args[-1]).is_file(), args[-1]
    result = subprocess.run([sys.executable, *args], cwd=PACK_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"adapted layers\s+[1-9]", result.stdout), result.stdout
