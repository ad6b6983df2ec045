"""python -m fera_core train (FeRA, and SODA with --method) on a tiny generated SD1.5-layout pipeline (random
weights, no hub).

Runs share one pipeline and image folder; each run is a few optimizer steps at 16 x 16 pixels.
"""
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from diffusers_pipeline import make_images, make_pipeline, make_sd3, make_sdxl  # noqa: E402

from fera_core import FeRAConfig, FeRAModel, load_adapter  # noqa: E402
from fera_core.__main__ import main  # noqa: E402
from fera_core.soda import SODAConfig, SODAModel, load_soda  # noqa: E402
from fera_core.training.diffusers_objective import SchedulerObjective  # noqa: E402
from fera_core.training.cli import (Denoiser, ImageCaptions, Pipeline, batch_indices, checkpoints,  # noqa: E402
                                       load_checkpoint, step_generator)
from fera_core.training.step import noise_draws, training_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_pipeline(root / "pipe"), make_images(root / "images")


def args_for(setup, out, *extra, steps=6):
    pipe, images = setup
    return [str(a) for a in ("train", pipe, images, "--output", out, "--max-steps", steps, "--batch-size", 4,
                             "--resolution", 16, "--learning-rate", 1e-2, "--checkpoint-every", 3, "--log-every", 1,
                             *extra)]


def run_inline(setup, out, *extra, steps=6):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.tiny_unet: a tiny UNet on a busy CPU is faster on one thread
    try:
        assert main(args_for(setup, out, *extra, steps=steps)) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((Path(out) / "losses.json").read_text())


def run_process(setup, out, *extra, launcher, steps=6, check=True, **env):
    """Freshly started processes under `launcher` (for torchrun-started ones)."""
    code = "import sys\nfrom fera_core.__main__ import main; sys.exit(main(sys.argv[1:]))"
    script = Path(out).parent / f"run_{Path(out).name}.py"
    script.write_text(code)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run([*launcher, str(script), *args_for(setup, out, *extra, steps=steps)], env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def two_processes():
    """accelerate's torchrun launcher for 2 processes, on a free port (another run may hold the default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no")


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """Six uninterrupted steps, the run the others are compared with."""
    out = tmp_path_factory.mktemp("straight") / "out"
    return out, run_inline(setup, out)


def adapter_tensors(out):
    return load_adapter(Path(out) / "adapter.safetensors").file_state_dict()


def assert_same_adapter(a, b, tol):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def test_outputs_load_and_trace_every_row(straight):
    out, losses = straight
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    adapter = load_adapter(out / "adapter.safetensors")
    # The family is recorded (SD1's UNet has no linear projection; was "unknown"), and fera.training holds the
    # run's settings (was "true": nn.Module's train flag, which the adapter's attribute shadowed).
    assert adapter.config.base_model == "sd15" and len(adapter.layers) == 24
    assert adapter.training_settings["steps"] == 6 and adapter.training_settings["rank"] == 4
    assert adapter.training is True  # to_q/k/v of attn1 and attn2 in four transformer blocks
    trace = json.loads((out / "adapter.trace.json").read_text())
    rows = trace["rows"]
    assert len(rows) == 6 * 4 and [r["step"] for r in rows[::4]] == [1, 2, 3, 4, 5, 6]
    assert all(abs(sum(r["weights"]) - 1) < 1e-5 and r["sigma"] > 0 for r in rows)
    assert [p.name for _, p in checkpoints(out / "checkpoints")] == ["step-00000003.pt", "step-00000006.pt"]


def evaluation_loss(pipe, images, adapter=None, seeds=range(3), method=FeRAModel, config=FeRAConfig):
    """Mean training loss over all images at fixed noise draws, with a trained adapter or a fresh one
    (FeRA: zero up-projections; SODA: zero increments, identity rotations; either exactly the base model).
    method, config: FeRAModel, FeRAConfig or SODAModel, SODAConfig."""
    pipeline = Pipeline(pipe, "cpu", torch.float32)
    data = ImageCaptions(images, 16)
    x0 = pipeline.latents(torch.stack([data.pixels(i) for i in range(len(data))]))
    cond = pipeline.text(data.captions, 16)
    torch.manual_seed(0)
    adapted = method.from_file(pipeline.model, adapter) if adapter else method(pipeline.model, config())
    objective = SchedulerObjective(pipeline.scheduler, Denoiser(adapted, pipeline))
    with torch.no_grad():
        return sum(training_step(objective, x0, cond, adapted.config, torch.Generator().manual_seed(s)).loss.item()
                   for s in seeds) / len(seeds)


def test_loss_falls(setup, tmp_path):
    """Thirty steps at lr 1e-2 lower the loss on fixed draws over all six images by more than 5%
    (seen: 14%); the same draws give the same value twice, so the drop is the training's."""
    out = tmp_path / "out"
    run_inline(setup, out, "--checkpoint-every", 30, steps=30)
    before = evaluation_loss(*setup)
    assert evaluation_loss(*setup) == before
    after = evaluation_loss(*setup, adapter=out / "adapter.safetensors")
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("method", ["soda-svd"])  # soda-qr trains through the same code (seen: both ~7%)
def test_soda_loss_falls(setup, tmp_path, method):
    """--method soda-*: ten steps at lr 3e-2 lower the loss on fixed draws over all six images by more than 3%
    (seen: 7%); the file is a SODA adapter of the pipeline's family and no routing trace is written; an adapter
    that does not learn stays the base model exactly (the same draws give the same value twice)."""
    out = tmp_path / "out"
    losses = run_inline(setup, out, "--method", method, "--checkpoint-every", 10, "--learning-rate", 3e-2, steps=10)
    assert len(losses) == 10 and all(r["fecl"] == 0.0 for r in losses)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "checkpoints", "losses.json"]
    adapter = load_soda(out / "adapter.safetensors")
    assert adapter.config.method == method and adapter.config.base_model == "sd15"
    assert adapter.training_settings["method"] == method and adapter.orthogonality_error() < 1e-5
    soda = dict(method=SODAModel, config=SODAConfig)
    before = evaluation_loss(*setup, **soda)
    assert evaluation_loss(*setup, **soda) == before
    after = evaluation_loss(*setup, adapter=out / "adapter.safetensors", **soda)
    assert after < 0.97 * before, (before, after)
    assert json.loads((out / "losses.json").read_text()) == losses


def test_resume_continues_exactly(setup, straight, tmp_path):
    """Three steps, then --resume to six: the same losses and adapter as six straight steps (same process
    kind and shapes, so the same kernels; 1e-6 only allows for nothing-but-rounding)."""
    out = tmp_path / "out"
    first = run_inline(setup, out, steps=3)
    resumed = run_inline(setup, out, "--resume")
    ref_out, ref = straight
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and resumed[:3] == first
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]), torch.tensor([r["loss"] for r in ref]),
                               rtol=1e-6, atol=1e-6)
    assert_same_adapter(out, ref_out, 1e-6)
    trace = json.loads((out / "adapter.trace.json").read_text())["rows"]
    assert [r["call"] for r in trace] == [c for c in range(6) for _ in range(4)]
    # The learning moved the adapter far more than the tolerance.
    moved = max(v.abs().max() for k, v in adapter_tensors(out).items() if "lora_up" in k)
    assert moved > 1e-3


def _train_and_die_in_step_6s_save(argv):
    """In the forked child: train with torch.save planted to write half of step 6's checkpoint, then SIGKILL."""
    real = torch.save

    def save(obj, f, *a, **k):
        if "step-00000006" in str(f):
            Path(f).write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, f, *a, **k)
    torch.save = save
    torch.set_num_threads(1)  # as run_inline does (and as DataLoader's forked workers do)
    sys.exit(main(argv))


def test_killed_run_leaves_last_checkpoint_intact(setup, straight, tmp_path):
    """SIGKILL while step 6's checkpoint is being written (its temporary file half written): step 3's
    checkpoint is still complete and loadable, no step-6 file appears, and --resume finishes the run
    with the uninterrupted run's adapter."""
    out = tmp_path / "out"
    # A forked child, not a new interpreter: it has this process's imports (diffusers alone takes
    # seconds to start) and dies by a real SIGKILL all the same. Its stderr is the test's.
    child = multiprocessing.get_context("fork").Process(target=_train_and_die_in_step_6s_save,
                                                        args=(args_for(setup, out),))
    child.start()
    try:
        child.join(300)
        assert child.exitcode == -signal.SIGKILL, child.exitcode  # None: still running after 300 s
    finally:
        if child.is_alive():
            child.kill()
    folder = out / "checkpoints"
    assert [p.name for _, p in checkpoints(folder)] == ["step-00000003.pt"]
    assert any(p.name.endswith(".tmp") for p in folder.iterdir())  # what the kill left behind
    assert load_checkpoint(folder / "step-00000003.pt")["step"] == 3
    assert not (out / "adapter.safetensors").exists()
    run_inline(setup, out, "--resume")
    assert_same_adapter(out, straight[0], 1e-5)


def test_two_processes_match_one(setup, straight, tmp_path):
    """Two CPU processes under accelerate (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2:
    torchrun-started, gloo; `--cpu --num_processes 2` would start one process): each process trains on half of every global batch of 4, with
    the draws of the whole batch, and DDP averages the gradients. Only summation order differs from one
    process (two half-batch reductions and an all-reduce instead of one): over 20 steps at this learning rate
    the losses agreed to 1.2e-7 relative and the adapters to 7.5e-6 (weights up to 0.2; Adam turns rounding
    in near-zero gradients into movement). Tolerances: 1e-5 relative for losses, 1e-4 for weights. Per-process
    draws instead of the global batch's break both (planted and seen)."""
    out = tmp_path / "out"
    run_process(setup, out, launcher=two_processes(), ACCELERATE_USE_CPU="1")
    assert json.loads((out / "adapter.trace.json").read_text())["meta"]["processes"] == 2
    two = json.loads((out / "losses.json").read_text())
    one = straight[1]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    l1, l2 = (torch.tensor([r["loss"] for r in rows]) for rows in (one, two))
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert_same_adapter(out, straight[0], 1e-4)
    rows = json.loads((out / "adapter.trace.json").read_text())["rows"]
    assert len(rows) == 6 * 4  # both processes' rows are traced


def test_gradient_accumulation_matches_one_batch(setup, straight, tmp_path):
    """Two accumulation micro-steps of 2 images make the same optimizer steps as one batch of 4 (accelerate
    divides each micro-step's loss by 2): the same curve, to float32 summation order (1e-5). Adapter
    weights get 1e-4: Adam divides by sqrt(v), so an element whose gradient is almost zero turns rounding
    into up to ~2e-5 of movement (seen); the training moves the weights by ~1e-2 per step."""
    out = tmp_path / "out"
    losses = run_inline(setup, out, "--gradient-accumulation-steps", "2")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in losses]),
                               torch.tensor([r["loss"] for r in straight[1]]), rtol=1e-5, atol=1e-5)
    assert_same_adapter(out, straight[0], 1e-4)


def test_global_batch_draws_do_not_depend_on_the_split():
    """The rows a process gets are the global batch's rows, and noise_draws gives each row the same draws
    whichever process computes it."""
    assert batch_indices(0, 4, 6, 0) + batch_indices(1, 4, 6, 0) + batch_indices(2, 4, 6, 0) == \
        batch_indices(0, 12, 6, 0)
    epochs = batch_indices(0, 12, 6, 0)
    assert sorted(epochs[:6]) == sorted(epochs[6:]) == list(range(6)) and epochs[:6] != epochs[6:]
    u, noise = noise_draws((4, 4, 8, 8), step_generator(5, 3, "cpu"))
    u2, noise2 = noise_draws((4, 4, 8, 8), step_generator(5, 3, "cpu"))
    assert torch.equal(u, u2) and torch.equal(noise, noise2)
    # The run's seed and the step both matter (a packed 64-bit seed lost the run's seed on CPU generators).
    for other in (step_generator(6, 3, "cpu"), step_generator(5, 4, "cpu")):
        assert not torch.equal(noise_draws((4, 4, 8, 8), other)[0], u)
    assert batch_indices(0, 6, 6, 0) != batch_indices(0, 6, 6, 1)


@pytest.mark.parametrize("extra, message", [
    (("--batch-size", "3", "--gradient-accumulation-steps", "2"), "must divide into 1 processes x 2"),
    (("--resume",), "no checkpoint"),
    (("--indicator", "wavelet"), "invalid choice"),
])
def test_bad_settings_are_refused(setup, tmp_path, capsys, extra, message):
    try:
        code = main(args_for(setup, tmp_path / "out", *extra))
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_missing_caption_and_changed_resume_settings_are_refused(setup, tmp_path, capsys):
    pipe, images = setup
    partial = tmp_path / "images"
    shutil.copytree(images, partial)
    (partial / "img2.txt").unlink()
    assert main(["train", str(pipe), str(partial), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "1 image(s)" in err and "img2.png" in err
    out = tmp_path / "out"
    run_inline(setup, out, steps=3)
    assert main(args_for(setup, out, "--resume", "--seed", "1")) == 2
    assert "'seed': (1, 0)" in capsys.readouterr().err


@pytest.mark.parametrize("make, family, prediction", [(make_sdxl, "sdxl", "epsilon"), (make_sd3, "sd3", "flow")])
def test_sdxl_and_sd3_layouts_train(setup, tmp_path, make, family, prediction):
    """The other supported layouts: two text encoders and SDXL's size conditioning; SD3's transformer, pooled
    projections and flow matching. Three steps write an adapter for the family whose experts moved."""
    pipe = make(tmp_path / "pipe")
    out = tmp_path / "out"
    assert main([str(a) for a in ("train", pipe, setup[1], "--output", out, "--max-steps", 3, "--batch-size", 2,
                                  "--resolution", 16, "--learning-rate", 1e-2, "--log-every", 1)]) == 0
    adapter = load_adapter(out / "adapter.safetensors")
    assert adapter.config.base_model == family and len(adapter.layers) > 0
    assert max(e.up.abs().max() for e in adapter.layers.values()) > 1e-3
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    assert SchedulerObjective(Pipeline(pipe, "cpu", torch.float32).scheduler, None).prediction == prediction


def test_processes_accelerate_does_not_join_are_refused(setup, tmp_path):
    """torchrun-started processes that accelerate does not recognise (no ACCELERATE_USE_CPU on a CPU machine)
    would each train the whole batch alone and write the same files: refused before any work."""
    proc = run_process(setup, tmp_path / "out", launcher=two_processes(), check=False, ACCELERATE_USE_CPU="0")
    assert proc.returncode != 0 and "launched as 2 processes, but accelerate runs 1" in proc.stderr
    assert not (tmp_path / "out").exists()
