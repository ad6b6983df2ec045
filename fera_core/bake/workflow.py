"""A baked schedule as a ComfyUI workflow (UI format) that needs no FeRA: only built-in nodes.

Per expert: Create Hook LoRA (MO) -> a chain of Create Hook Keyframe (one per step) -> Set Hook
Keyframes; the experts' hooks are combined (Combine Hooks [2]) and attached to both the positive
and the negative conditioning (Cond Pair Set Props), so every row of every step gets the schedule,
as FeRA's routing did. The rest is a plain text-to-image graph. Plain JSON: no ComfyUI import.
"""
from __future__ import annotations

_SIZES = {"CreateHookKeyframe": [260, 82], "KSampler": [315, 262], "CLIPTextEncode": [400, 200]}


class _Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_: str, pos, widgets=(), inputs=(), outputs=(), title=None) -> int:
        """inputs: [(name, type)] sockets in slot order; outputs: [(name, type)]."""
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": _SIZES.get(type_, [315, 100]),
                "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "slot_index": i, "links": []} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, src_slot: int, dst: int, dst_name: str) -> None:
        link_id = len(self.links) + 1
        out = self.nodes[src - 1]["outputs"][src_slot]
        slot = next(i for i, inp in enumerate(self.nodes[dst - 1]["inputs"]) if inp["name"] == dst_name)
        self.nodes[dst - 1]["inputs"][slot]["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, slot, out["type"]])

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def hook_workflow(schedule: dict, checkpoint: str = "model.safetensors", prompt: str = "", negative: str = "",
                  sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.0, seed: int = 0,
                  width: int = 512, height: int = 512) -> dict:
    """UI workflow sampling len(schedule['steps']) steps with the schedule's per-step expert strengths.

    The strengths hold for the sampler, scheduler and step count of the traced run (keyframes are
    placed by schedule percent); give the same ones here.
    """
    frames = schedule.get("keyframes")
    if not frames:
        raise ValueError(f"this schedule has no hook keyframes: {schedule.get('keyframes_unavailable', 'none given')}")
    g = _Graph()
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), [checkpoint], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"),
                                                                           ("VAE", "VAE")])
    texts = [g.add("CLIPTextEncode", (0, 200 + 250 * i), [text], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
                   title=title) for i, (text, title) in enumerate(((prompt, "positive"), (negative, "negative")))]
    for t in texts:
        g.link(ckpt, 1, t, "clip")
    hooks = []
    for m, lora in enumerate(schedule["loras"]):
        y = 800 + 300 * m
        hook = g.add("CreateHookLoraModelOnly", (450, y), [lora, schedule["strength"]], [("prev_hooks", "HOOKS")],
                     [("HOOKS", "HOOKS")], title=f"expert {m}")
        prev = None
        for k, frame in enumerate(frames):
            kf = g.add("CreateHookKeyframe", (800 + 280 * k, y), [frame["strengths"][m], frame["start_percent"]],
                       [("prev_hook_kf", "HOOK_KEYFRAMES")], [("HOOK_KF", "HOOK_KEYFRAMES")], title=f"expert {m} step {k}")
            if prev is not None:
                g.link(prev, 0, kf, "prev_hook_kf")
            prev = kf
        scheduled = g.add("SetHookKeyframes", (800, y + 150), inputs=[("hooks", "HOOKS"), ("hook_kf", "HOOK_KEYFRAMES")],
                          outputs=[("HOOKS", "HOOKS")])
        g.link(hook, 0, scheduled, "hooks")
        g.link(prev, 0, scheduled, "hook_kf")
        hooks.append(scheduled)
    combined = hooks[0]
    for other in hooks[1:]:
        node = g.add("CombineHooks2", (450, 500), inputs=[("hooks_A", "HOOKS"), ("hooks_B", "HOOKS")],
                     outputs=[("HOOKS", "HOOKS")])
        g.link(combined, 0, node, "hooks_A")
        g.link(other, 0, node, "hooks_B")
        combined = node
    pair = g.add("PairConditioningSetProperties", (450, 200), [1.0, "default"],
                 [("positive_NEW", "CONDITIONING"), ("negative_NEW", "CONDITIONING"), ("mask", "MASK"),
                  ("hooks", "HOOKS"), ("timesteps", "TIMESTEPS_RANGE")],
                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING")])
    g.link(texts[0], 0, pair, "positive_NEW")
    g.link(texts[1], 0, pair, "negative_NEW")
    g.link(combined, 0, pair, "hooks")
    latent = g.add("EmptyLatentImage", (450, 0), [width, height, 1], outputs=[("LATENT", "LATENT")])
    sampler_node = g.add("KSampler", (800, 0), [seed, "fixed", len(frames), cfg, sampler, scheduler, 1.0],
                         [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")], [("LATENT", "LATENT")])
    g.link(ckpt, 0, sampler_node, "model")
    g.link(pair, 0, sampler_node, "positive")
    g.link(pair, 1, sampler_node, "negative")
    g.link(latent, 0, sampler_node, "latent_image")
    decode = g.add("VAEDecode", (1150, 0), inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")])
    g.link(sampler_node, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    save = g.add("SaveImage", (1400, 0), ["fera_baked"], [("images", "IMAGE")])
    g.link(decode, 0, save, "images")
    return g.workflow()
