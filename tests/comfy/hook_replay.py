"""Runs a UI workflow's nodes in process with ComfyUI's own node classes (no server, no frontend):
how the host tests and benchmarks replay a baked schedule with ComfyUI's hook keyframe nodes."""
from comfy_host import setup_comfy

setup_comfy()
import comfy_extras.nodes_hooks as hook_nodes  # noqa: E402

WIDGET_KINDS = ("FLOAT", "INT", "STRING", "BOOLEAN", "COMBO")


def run_nodes(workflow: dict, classes: dict, given: dict) -> dict:
    """Outputs of the nodes of `workflow` whose type is in `classes` (ComfyUI V1 or V3 node classes),
    executed with their widget values and links; other nodes' outputs are taken from `given` (by
    title, else type)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    done = {}

    def outputs(node_id):
        if node_id not in done:
            node = nodes[node_id]
            cls = classes.get(node["type"])
            if cls is None:
                done[node_id] = given[node.get("title", node["type"])]
                return done[node_id]
            widgets, kwargs = iter(node["widgets_values"]), {}
            spec = cls.INPUT_TYPES()
            for name, (kind, *_) in [*spec["required"].items(), *spec.get("optional", {}).items()]:
                socket = next((i for i in node["inputs"] if i["name"] == name), None)
                if socket is not None and socket["link"] is not None:
                    _, src, slot, *_ = links[socket["link"]]
                    kwargs[name] = outputs(src)[slot]
                elif isinstance(kind, list) or kind in WIDGET_KINDS:
                    kwargs[name] = next(widgets)
            assert next(widgets, None) is None, f"{node['type']}: more widget values than widgets"
            if hasattr(cls, "execute"):  # V3
                done[node_id] = cls.execute(**kwargs).args
            else:
                done[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return done[node_id]

    return {node_id: outputs(node_id) for node_id in nodes if nodes[node_id]["type"] in classes}


def run_hook_nodes(workflow: dict, given: dict) -> dict:
    """run_nodes with ComfyUI's built-in hook nodes (comfy_extras/nodes_hooks.py)."""
    return run_nodes(workflow, hook_nodes.NODE_CLASS_MAPPINGS, given)


def hooked_conds(workflow: dict, positive, negative):
    """(positive, negative) with the workflow's hooks attached, as its Cond Pair Set Props outputs them."""
    pair = next(n["id"] for n in workflow["nodes"] if n["type"] == "PairConditioningSetProperties")
    return run_hook_nodes(workflow, {"positive": (positive,), "negative": (negative,)})[pair]


def percent_of(model_sampling, sigma: float) -> float:
    """Inverse of percent_to_sigma by bisection (exact enough: 50 halvings)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(model_sampling.percent_to_sigma(mid)) > sigma else (lo, mid)
    return (lo + hi) / 2
