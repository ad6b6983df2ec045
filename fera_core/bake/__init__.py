"""Bake a FeRA adapter for tools without FeRA: one LoRA at a fixed expert mix (lora, mix), or one LoRA
per expert with a per-step schedule and a ComfyUI hook-keyframe workflow (schedule, workflow); and a SODA
adapter into one LoRA of a chosen rank (soda)."""
from .lora import bake_lora, read_baked_lora, router_mix, save_lora
from .mix import resolve_mix
from .schedule import expert_loras, schedule, trace_steps
from .soda import bake_soda

__all__ = ["bake_lora", "bake_soda", "expert_loras", "read_baked_lora", "resolve_mix", "router_mix", "save_lora", "schedule",
           "trace_steps"]
