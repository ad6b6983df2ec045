"""python -m fera_core train: a FeRA adapter for a diffusers pipeline, on one process or many.

    python -m fera_core train PIPELINE_DIR IMAGES_DIR --output OUT [--max-steps 1000 ...]
    accelerate launch --multi_gpu --num_processes 8 -m fera_core train PIPELINE_DIR IMAGES_DIR --output OUT
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m fera_core train ...   (CPU processes)

--method soda-svd | soda-qr trains a SODA adapter instead (fera_core.soda: spectrum increments and
Kronecker-factored rotations of the target layers' weights; plain MSE, no routing trace); FeRA's
options (--rank, --alpha, --num-experts, --num-bands, --tau, --indicator, --fecl-weight) do not apply.

PIPELINE_DIR is a `save_pretrained` directory of a StableDiffusion (1.x/2.x), StableDiffusionXL
or StableDiffusion3 pipeline (UNet or transformer, text encoders and tokenizers, VAE,
scheduler); IMAGES_DIR holds images with same-named .txt captions. The loss is fera_core.training's, with the scheduler's objective
(fera_core.diffusers_objective). Scale-out is accelerate's: data-parallel processes, mixed
precision and gradient accumulation; --batch-size is the GLOBAL batch of one optimizer step,
split over processes and accumulation micro-steps. Every random draw of step s (image order,
noise levels, noise) is made for the whole global batch from (seed, s), so the loss curve is
the same however the batch is split, and a resumed run continues exactly: that is why a
checkpoint needs no RNG state beyond its step.

Writes OUT/adapter.safetensors (the project's adapter format), OUT/adapter.trace.json (FeRA: the
routing of every training row: step, noise level, band energies, expert weights),
OUT/losses.json, and OUT/checkpoints/step-N.pt every --checkpoint-every steps (adapter,
optimizer and LR-schedule state, step, losses, trace; each written atomically).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..cli import guarded
from ..config import FeRAConfig
from ..indicator import DEFINITIONS, REFERENCE
from ..model import FeRAModel
from ..soda.config import IN, METHODS, SIDES, SODAConfig, parse_factor_sizes
from ..soda.model import SODAModel
from ..trace import RoutingTrace
from .checkpoints import checkpoints, load_checkpoint, save_checkpoint, settings_of
from .data import ImageCaptions, TrainingError, batch_indices, derived_seed, step_generator
from .diffusers_objective import SchedulerObjective
from .pipeline import Denoiser, Pipeline
from .step import noise_draws, training_step


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a FeRA adapter on a diffusers pipeline (accelerate-ready)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline", help="diffusers pipeline directory (save_pretrained layout)")
    p.add_argument("data", help="folder of images with same-named .txt captions")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="global images per optimizer step (default 4)")
    p.add_argument("--resolution", type=int, default=512, help="square training size in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (reference: 1e-4)")
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-weight-decay", type=float, default=1e-2)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: accelerate's configuration (no)")
    p.add_argument("--method", choices=("fera", *METHODS), default="fera",
                   help="fera (default), or SODA with an SVD or QR factorisation")
    p.add_argument("--soda-side", choices=SIDES, default=IN,
                   help="SODA: rotate the weights' input side (V / LQ's Q; default) or output side (U / QR's Q)")
    p.add_argument("--factor-sizes", default="",
                   help="SODA: Kronecker factor sizes by dimension, e.g. 320=16x20,640=20x32 (default: two "
                        "factors as close to square as the dimension allows)")
    p.add_argument("--diff-tuning", action="store_true",
                   help="Diff-Tuning emphasis: noise levels drawn with p(u) ~ u (towards high noise)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--num-experts", type=int, default=3)
    p.add_argument("--num-bands", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.7, help="router temperature")
    p.add_argument("--indicator", choices=DEFINITIONS, default=REFERENCE)
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0", help="comma-separated target layer names")
    p.add_argument("--match-full-name", action="store_true", help="match targets on full module paths")
    p.add_argument("--fecl-weight", type=float, default=0.1)
    p.add_argument("--base-model", default=None, help="model family recorded in the adapter (default: guessed)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT/checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between loss read-outs (each one syncs)")
    p.set_defaults(handler=guarded(run))


def _config(args, family: str) -> FeRAConfig | SODAConfig:
    family = args.base_model or family
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        if args.method != "fera":  # SODA: targets are module paths or path suffixes
            return SODAConfig(variant=METHODS[args.method], side=args.soda_side,
                              factor_sizes=parse_factor_sizes(args.factor_sizes), target_modules=targets,
                              base_model=family).validate()
        return FeRAConfig(rank=args.rank, alpha=args.alpha, num_bands=args.num_bands, num_experts=args.num_experts,
                          router_tau=args.tau, target_modules=[t.strip() for t in args.targets.split(",") if t.strip()],
                          fecl_weight=args.fecl_weight, indicator=args.indicator, match_full_name=args.match_full_name,
                          base_model=family).validate()
    except ValueError as err:
        raise TrainingError(f"adapter settings: {err}") from None


def _check(args, world: int) -> int:
    for name in ("max_steps", "batch_size", "resolution", "gradient_accumulation_steps", "checkpoint_every",
                 "keep_checkpoints", "log_every"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    split = world * args.gradient_accumulation_steps
    if args.batch_size % split:
        raise TrainingError(f"--batch-size {args.batch_size} must divide into {world} processes x "
                            f"{args.gradient_accumulation_steps} accumulation steps")
    return args.batch_size // split


def train(args) -> dict:
    """Run the training described by the parsed arguments; returns {'adapter', 'trace', 'losses'} paths."""
    try:
        import diffusers  # noqa: F401
        from accelerate import Accelerator
        from tqdm.auto import tqdm
    except ImportError as err:
        raise TrainingError(f"training needs diffusers, transformers and accelerate ({err}): "
                            "pip install diffusers transformers accelerate tqdm pillow") from None

    acc = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise TrainingError(f"launched as {launched} processes, but accelerate runs {acc.num_processes}: each would "
                            "train alone. On CPUs set ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu "
                            "--num_processes N); `accelerate launch --cpu --num_processes N` starts only one process")
    micro = _check(args, acc.num_processes)
    out = Path(args.output)
    ckpt_dir = out / "checkpoints"
    data = ImageCaptions(args.data, args.resolution)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    pipeline = Pipeline(args.pipeline, acc.device, weight_dtype)
    shape = pipeline.latent_shape(args.resolution)
    config = _config(args, pipeline.family)
    torch.manual_seed(args.seed)  # the same fresh adapter on every process
    fera = FeRAModel(pipeline.model, config) if args.method == "fera" else SODAModel(pipeline.model, config)
    if not fera.adapter.layers:
        raise TrainingError(f"no layer of the {type(pipeline.model).__name__} matches --targets {args.targets}")
    fera.adapter.to(acc.device)
    denoiser = Denoiser(fera, pipeline)
    params = list(fera.adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    warmup = args.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    start, losses, trace_rows = 0, [], []
    if args.resume:
        found = checkpoints(ckpt_dir)
        if not found:
            raise TrainingError(f"--resume: no checkpoint in {ckpt_dir}")
        state = load_checkpoint(found[-1][1])
        now, then = settings_of(args), state["settings"]
        differ = {k: (now.get(k), then.get(k)) for k in set(now) | set(then) if now.get(k) != then.get(k)}
        if differ:
            raise TrainingError(f"--resume: {found[-1][1].name} was made with other settings (now, then): {differ}")
        fera.adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        start, losses, trace_rows = state["step"], state["losses"], json.loads(state["trace"])
        acc.print(f"resuming from {found[-1][1]} at step {start}")
    model, optimizer = acc.prepare(denoiser, optimizer)
    objective = SchedulerObjective(pipeline.scheduler, model)
    new_trace = lambda: RoutingTrace(max_calls=args.checkpoint_every * args.gradient_accumulation_steps)  # noqa: E731
    trace = new_trace()
    rank, world = acc.process_index, acc.num_processes
    pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (step, loss, mse, fecl) on device
    bar = tqdm(total=args.max_steps, initial=start, disable=not acc.is_local_main_process, desc="FeRA training")

    def flush():
        if pending:
            values = torch.stack([torch.stack(p[1:]) for p in pending]).cpu().tolist()
            losses.extend({"step": p[0], "loss": v[0], "mse": v[1], "fecl": v[2]} for p, v in zip(pending, values))
            pending.clear()
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")

    for step in range(start, args.max_steps):
        rows = batch_indices(step, args.batch_size, len(data), args.seed)
        u_all, noise_all = noise_draws((args.batch_size, *shape), step_generator(args.seed, step, acc.device),
                                       acc.device, args.diff_tuning)
        torch.manual_seed(derived_seed(args.seed, step, rank, -2))  # expert dropout, if any
        parts_of_step = []
        for k in range(args.gradient_accumulation_steps):
            lo = (k * world + rank) * micro
            mine = slice(lo, lo + micro)
            with acc.accumulate(model):
                x0 = pipeline.latents(torch.stack([data.pixels(i) for i in rows[mine]]))
                cond = pipeline.text([data.captions[i] for i in rows[mine]], args.resolution)
                result = training_step(objective, x0, cond, config, diff_tuning=args.diff_tuning,
                                       draws=(u_all[mine], noise_all[mine]))
                acc.backward(result.loss)
                if acc.sync_gradients and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            parts_of_step.append(torch.stack([result.loss.detach(), result.mse, result.fecl]))
            routing = acc.unwrap_model(model).routing
            if routing is not None:  # FeRA: record the routing of every row
                a, b, _ = objective.coefficients(u_all[mine])
                e_all, w_all, s_all = acc.gather((*routing, objective.sigma(a, b)))
                trace.record(e_all, w_all, s_all, step=step + 1)
        lr_schedule.step()
        mean = acc.reduce(torch.stack(parts_of_step).mean(0), reduction="mean")
        pending.append((step + 1, *mean))
        bar.update(1)
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps:
            flush()
        if done % args.checkpoint_every == 0 or done == args.max_steps:
            flush()
            trace_rows += _shifted(trace, trace_rows)
            trace = new_trace()
            if acc.is_main_process:
                save_checkpoint(ckpt_dir, done, fera, optimizer, lr_schedule, losses, trace_rows, settings_of(args),
                                 args.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    paths = {"adapter": out / "adapter.safetensors", "trace": out / "adapter.trace.json", "losses": out / "losses.json"}
    if args.method != "fera":
        del paths["trace"]  # SODA routes nothing
    if acc.is_main_process:
        meta = {"adapter": paths["adapter"].name, "run": "training", "settings": settings_of(args),
                "processes": acc.num_processes}
        fera.adapter.training_settings = dict(settings_of(args), steps=args.max_steps, processes=acc.num_processes,
                                              mixed_precision=acc.mixed_precision,
                                              final_loss=losses[-1]["loss"] if losses else None)
        fera.save_adapters(paths["adapter"])
        out.mkdir(parents=True, exist_ok=True)
        if "trace" in paths:
            atomic_write_text(paths["trace"], RoutingTrace.from_rows(trace_rows, meta).to_json())
        atomic_write_text(paths["losses"], json.dumps(losses))
    acc.wait_for_everyone()
    acc.end_training()
    return paths


def _shifted(trace: RoutingTrace, earlier: list[dict]) -> list[dict]:
    """The trace's rows, numbered after the rows recorded before it."""
    offset = earlier[-1]["call"] + 1 if earlier else 0
    return [dict(r, call=r["call"] + offset) for r in trace.rows()]


def run(args) -> None:
    paths = train(args)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
