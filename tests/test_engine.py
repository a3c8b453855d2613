"""The training loop on tiny ViTs and a small folder of real photos (scikit-image's samples), on the CPU."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
from PIL import Image
from skimage import data as skdata

from adclr.errors import InvalidSettingError
from adclr.train import NonFiniteLossError, TrainConfig, Trainer, train
from adclr.load import read_training_checkpoint
from adclr.train.checkpoint import CHECKPOINT_NAME, export_teacher, save_atomic
from adclr.train.heads import DINOHead

TINY = dict(arch="test_vit", img_size=32, model_kwargs={"patch_size": 8}, local_crops=2, local_size=16,
            num_queries=3, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, batch_size=4, workers=0,
            warmup_epochs=1, warmup_teacher_temp_epochs=1, log_every=1)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """16 random 96 px crops of four scikit-image sample photos, in nested folders, plus one unreadable file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    for i in range(16):
        photo = photos[i % 4]
        y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
        sub = root / f"part{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(photo[y:y + 96, x:x + 96]).save(sub / f"{i:02d}.png")
    (root / "part0" / "broken.png").write_bytes(b"not a png")
    return root


def _cfg(folder: Path, output: Path, **overrides) -> TrainConfig:
    return TrainConfig(data=str(folder), output=str(output), **{**TINY, "epochs": 2, **overrides})


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainable_parameters_equal_dino(photo_folder, tmp_path):
    trainer = Trainer(_cfg(photo_folder, tmp_path))
    backbone = timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=8)
    head = DINOHead(backbone.embed_dim, 64, hidden_dim=64, bottleneck_dim=32)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(trainer.student) == count(backbone) + count(head)
    assert sum(p.numel() for p in trainer.teacher.parameters()) == sum(p.numel() for p in trainer.student.parameters())


def test_steps_on_a_fixed_batch_lower_the_loss(photo_folder, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_cfg(photo_folder, tmp_path, lr=2e-3, warmup_epochs=0, momentum_teacher=0.9,
                           freeze_last_layer=0, epochs=1))
    batch = next(iter(trainer.loader))
    losses = []
    for _ in range(25):
        trainer.step = 0  # hold the schedules still: this checks the optimisation, not the schedule
        losses.append(trainer.train_step(batch)["loss"])
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def _plain_dino_step(student, teacher, center, optimizer, batch, *, lr, wd, momentum, teacher_temp, mean, std,
                     clip=3.0, student_temp=0.1, center_momentum=0.9):
    """DINO's algorithm 1 written out from the paper, on the engine's networks' raw parameters: softmax of the centred
    teacher over every other student view, cross-entropy, AdamW on the student, a global gradient-norm clip, EMA
    teacher, centre EMA. -> (loss, new centre)."""
    def head(net, x):
        for layer in net.head.mlp:
            x = layer(x)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g = net.head.last_layer.parametrizations.weight.original0
        v = net.head.last_layer.parametrizations.weight.original1
        return x @ (g * v / v.norm(dim=1, keepdim=True)).T

    def outputs(net, views):
        return [head(net, net.backbone.forward_head(net.backbone.forward_features(v), pre_logits=True)) for v in views]

    normalise = lambda v: (v.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    globals_, locals_ = [normalise(v) for v in batch["global"]], [normalise(v) for v in batch["local"]]
    with torch.no_grad():
        t_out = outputs(teacher, globals_)
    s_out = outputs(student, globals_ + locals_)
    pairs = [(a, b) for a in range(len(t_out)) for b in range(len(s_out)) if a != b]
    loss = sum(-(torch.softmax((t_out[a] - center) / teacher_temp, -1)
                 * torch.log_softmax(s_out[b] / student_temp, -1)).sum(-1).mean() for a, b in pairs) / len(pairs)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    scale = min(1.0, clip / (float(torch.stack([g.norm() for g in grads]).norm()) + 1e-6))
    for g in grads:
        g.mul_(scale)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, (wd if group["decay"] else 0.0)
    optimizer.step()
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(momentum * t + (1 - momentum) * s)
    new_center = center_momentum * center + (1 - center_momentum) * torch.cat(t_out).mean(0, keepdim=True)
    return float(loss.detach()), new_center


def test_three_engine_steps_equal_plain_dino_from_the_same_start(photo_folder, tmp_path):
    # The DINO baseline (r = 0) is DINO: loss, optimiser, clip, EMA teacher and centre agree with the algorithm written
    # out plainly, step after step. (A training run that does not learn is then the recipe's doing, not a defect's.)
    import copy
    trainer = Trainer(_cfg(photo_folder, tmp_path, num_queries=0, drop_path=0.0, freeze_last_layer=0, lr=2e-3,
                           warmup_epochs=0, momentum_teacher=0.9, epochs=3))
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")]
    rest = [p for n, p in student.named_parameters()
            if p.requires_grad and not (p.ndim > 1 and not n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": decay, "decay": True}, {"params": rest, "decay": False}])
    center = torch.zeros(1, 64)
    batches = iter(trainer.loader)
    for step in range(3):
        batch = next(batches)
        expected, center = _plain_dino_step(
            student, teacher, center, optimizer, batch, lr=float(trainer.lr[step]), wd=float(trainer.wd[step]),
            momentum=float(trainer.momentum[step]), teacher_temp=float(trainer.teacher_temp[step]),
            mean=trainer.step_fn.mean, std=trainer.step_fn.std)
        record = trainer.train_step(batch)
        assert record["cls"] == pytest.approx(expected, rel=1e-5), step
    torch.testing.assert_close(trainer.loss.cls.center, center, rtol=1e-5, atol=1e-6)
    for (name, ours), theirs in zip(trainer.teacher.state_dict().items(), teacher.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_continues_exactly(photo_folder, tmp_path):
    straight = train(_cfg(photo_folder, tmp_path / "straight"))
    _ = train(_cfg(photo_folder, tmp_path / "interrupted"), until_epoch=1)
    assert read_training_checkpoint(tmp_path / "interrupted" / CHECKPOINT_NAME)["epoch"] == 1
    resumed = train(_cfg(photo_folder, tmp_path / "interrupted"), resume=True)
    assert _states_equal(straight.state_dict(), resumed.state_dict())
    a = read_training_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    b = read_training_checkpoint(tmp_path / "interrupted" / CHECKPOINT_NAME)
    assert _states_equal(a["student"], b["student"]) and _states_equal(a["loss"], b["loss"])
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 8)


def test_resume_of_a_checkpoint_older_than_a_setting_takes_that_setting_as_its_default(photo_folder, tmp_path):
    cfg = _cfg(photo_folder, tmp_path, epochs=1)
    train(cfg)
    checkpoint = read_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    del checkpoint["config"]["centering"]  # as written before the setting existed
    save_atomic(checkpoint, tmp_path / CHECKPOINT_NAME)
    assert Trainer(_cfg(photo_folder, tmp_path, epochs=2), resume=True).epoch == 1
    with pytest.raises(InvalidSettingError, match="centering"):
        Trainer(_cfg(photo_folder, tmp_path, epochs=2, centering="sinkhorn_knopp"), resume=True)


def test_resume_refuses_changed_settings(photo_folder, tmp_path):
    train(_cfg(photo_folder, tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"num_queries: checkpoint 3 vs now 5"):
        Trainer(_cfg(photo_folder, tmp_path, epochs=1, num_queries=5), resume=True)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        Trainer(_cfg(photo_folder, tmp_path / "elsewhere"), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(photo_folder, tmp_path):
    train(_cfg(photo_folder, tmp_path / "good", epochs=1))
    checkpoint = read_training_checkpoint(tmp_path / "good" / CHECKPOINT_NAME)
    checkpoint["config"]["epochs"] = 2
    checkpoint["student"]["backbone.patch_embed.proj.weight"].fill_(float("nan"))  # a diverged student
    path = tmp_path / "diverged" / CHECKPOINT_NAME
    save_atomic(checkpoint, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 4 .*last good checkpoint"):
        train(_cfg(photo_folder, tmp_path / "diverged"), resume=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("variant, num_queries, centering",
                         [("dino", 0, "center"), ("ibot", 3, "center"), ("ibot", 3, "sinkhorn_knopp")])
def test_variants_log_their_loss_terms(photo_folder, tmp_path, variant, num_queries, centering):
    train(_cfg(photo_folder, tmp_path, epochs=1, variant=variant, num_queries=num_queries, centering=centering))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "epoch_end" not in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
    assert all((r["query"] == 0) == (num_queries == 0) for r in steps)
    assert all((r["patch"] > 0) == (variant == "ibot") for r in steps[1:])  # step 0 may draw no masked image
    assert {"lr", "wd", "momentum", "teacher_temp", "images_per_s"} <= steps[0].keys()
    loss_state = read_training_checkpoint(tmp_path / CHECKPOINT_NAME)["loss"]
    assert {"cls.center", "query.center", "patch.center"} <= loss_state.keys()
    assert ("mask_token" in read_training_checkpoint(tmp_path / CHECKPOINT_NAME)["student"]) == (variant == "ibot")


def test_export_round_trip_into_timm(photo_folder, tmp_path):
    teacher = train(_cfg(photo_folder, tmp_path / "run", epochs=1, variant="ibot")).eval()
    info = export_teacher(tmp_path / "run" / CHECKPOINT_NAME, tmp_path / "export")
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert info["architecture"] == "test_vit" and "mask_token" not in model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), teacher.backbone.forward_features(x), atol=1e-6)


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, resume: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    teacher = train(TrainConfig.from_dict(cfg_dict), resume=resume)
    torch.save(teacher.state_dict(), Path(out) / f"teacher{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_run_ends_with_identical_weights(photo_folder, tmp_path):
    from conftest import _free_port

    cfg = _cfg(photo_folder, tmp_path / "run", epochs=1, batch_size=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    t0 = torch.load(tmp_path / "teacher0.pt", weights_only=True)
    t1 = torch.load(tmp_path / "teacher1.pt", weights_only=True)
    assert _states_equal(t0, t1)
    checkpoint = read_training_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert checkpoint["step"] == 4 and len(checkpoint["rng"]) == 2  # 16 images / (2 x 2) per step; one RNG per rank
    assert _states_equal(checkpoint["teacher"], t0)


def test_torchrun_command_line(photo_folder, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "adclr.train", "--data", str(photo_folder),
           "--output", str(tmp_path), "--arch", "test_vit", "--img-size", "32", "--model-kwargs", '{"patch_size": 8}',
           "--num-queries", "2", "--local-crops", "1", "--local-size", "16", "--out-dim", "32", "--head-hidden-dim",
           "32", "--head-bottleneck-dim", "16", "--epochs", "1", "--batch-size", "2", "--workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = read_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["num_queries"] == 2 and len(checkpoint["rng"]) == 2


def test_metrics_hold_collapse_diagnostics_and_a_uniform_teacher_is_named(photo_folder, tmp_path, caplog):
    # A teacher temperature of 10 flattens every teacher row: DINO's uniform collapse, on purpose.
    cfg = _cfg(photo_folder, tmp_path, warmup_teacher_temp=10.0, teacher_temp=10.0)
    with caplog.at_level("WARNING", logger="adclr.train.engine"):
        train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch_end" in r]
    for record in (records[0], epochs[-1]):
        for term in ("cls", "query"):
            assert record[f"{term}_teacher_entropy"] > 0.99 * np.log(64)
            assert {f"{term}_batch_entropy", f"{term}_kl"} <= record.keys()
    warnings = [r.getMessage() for r in caplog.records if "uniform" in r.getMessage()]
    assert len(warnings) == 2 and "cls teacher is uniform after epoch 1" in warnings[0]  # once per term, after warm-up
    assert "--teacher-temp" in warnings[0]


def test_presets_set_their_recipe_and_explicit_settings_win(photo_folder, tmp_path):
    from adclr.cli import main
    from adclr.train import PRESETS

    cfg = TrainConfig.from_preset("small", out_dim=64)
    assert (cfg.teacher_temp == cfg.warmup_teacher_temp == 0.02 and cfg.out_dim == 64
            and cfg.lr == PRESETS["small"]["lr"])
    with pytest.raises(InvalidSettingError, match="unknown preset 'huge'"):
        TrainConfig.from_preset("huge")
    main(["train", "--preset", "small", "--data", str(photo_folder), "--output", str(tmp_path), "--arch", "test_vit",
          "--img-size", "32", "--model-kwargs", '{"patch_size": 8}', "--local-size", "16", "--local-crops", "2",
          "--num-queries", "2", "--out-dim", "64", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
          "--batch-size", "4", "--epochs", "1", "--workers", "0"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["teacher_temp"] == 0.02 and saved["freeze_last_layer"] == 0 and saved["momentum_teacher"] == 0.99
    assert saved["momentum_teacher_end"] == 0.99 and saved["min_lr"] == 5e-4  # a short run's teacher keeps following
    assert saved["out_dim"] == 64 and saved["head_hidden_dim"] == 32  # the command line over the preset


def test_teacher_momentum_follows_its_cosine_to_the_configured_end(photo_folder, tmp_path):
    train(_cfg(photo_folder, tmp_path, momentum_teacher=0.9, momentum_teacher_end=0.95))
    momentum = [r["momentum"] for r in _records(tmp_path) if "epoch_end" not in r]
    assert len(momentum) == 8 and momentum[0] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(momentum, momentum[1:])) and 0.945 < momentum[-1] < 0.95  # never past the end


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _photos(source: Path, dest: Path, count: int) -> Path:
    """`count` readable photos of `source` (repeated when it has fewer)."""
    photos = sorted(p for p in source.rglob("*.png") if p.name != "broken.png")
    dest.mkdir()
    for i in range(count):
        (dest / f"{i:02d}.png").write_bytes(photos[i % len(photos)].read_bytes())
    return dest


@pytest.mark.parametrize("images, batch_size", [(8, 4), (32, 4), (16, 2)])
def test_resume_on_fewer_or_more_images_or_another_batch_size_follows_the_new_run_length(photo_folder, tmp_path, caplog,
                                                                                        images, batch_size):
    train(_cfg(photo_folder, tmp_path / "run"), until_epoch=1)  # 16 images, batches of 4: 4 steps per epoch
    data = _photos(photo_folder, tmp_path / "data", images)
    per_epoch = images // batch_size
    with caplog.at_level("WARNING", logger="adclr.train.engine"):
        trainer = Trainer(_cfg(data, tmp_path / "run", batch_size=batch_size), resume=True)
        trainer.fit()
    assert (trainer.epoch, trainer.step) == (2, 2 * per_epoch)
    assert f"steps per epoch: 4 -> {per_epoch}" in caplog.text
    assert (f"images: 16 -> {images}" in caplog.text) == (images != 16)
    assert (f"batch size per process: 4 -> {batch_size}" in caplog.text) == (batch_size != 4)
    second = [r for r in _records(tmp_path / "run") if r.get("epoch") == 1]
    assert [r["step"] for r in second] == list(range(per_epoch + 1, 2 * per_epoch + 1))
    planned = Trainer(_cfg(data, tmp_path / "planned", batch_size=batch_size))  # a run planned this way
    assert [r["lr"] for r in second] == [float(planned.lr[r["step"] - 1]) for r in second]
    assert [r["teacher_temp"] for r in second] == [float(planned.teacher_temp[r["step"] - 1]) for r in second]


def test_resume_on_two_processes_after_one(photo_folder, tmp_path):
    from conftest import _free_port

    from adclr.train.schedules import cosine_schedule

    cfg = _cfg(photo_folder, tmp_path / "run")
    train(cfg, until_epoch=1)  # one process: 4 steps per epoch
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path), True), nprocs=2, join=True)
    assert _states_equal(torch.load(tmp_path / "teacher0.pt", weights_only=True),
                         torch.load(tmp_path / "teacher1.pt", weights_only=True))
    checkpoint = read_training_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["world"]) == (2, 4, 2)  # 16 / (4 x 2): 2 per epoch
    second = [r for r in _records(tmp_path / "run") if r.get("epoch") == 1]
    lr = cosine_schedule(cfg.lr * 8 / 256, cfg.min_lr, 2, 2, cfg.warmup_epochs)  # the global batch is 8 now
    assert [r["step"] for r in second] == [3, 4] and [r["lr"] for r in second] == [float(lr[2]), float(lr[3])]


def _flags(settings: dict) -> list[str]:
    return [arg for k, v in settings.items()
            for arg in ("--" + k.replace("_", "-"), json.dumps(v) if isinstance(v, dict) else str(v))]


def test_resume_with_more_epochs_extends_the_run_and_fewer_is_refused(photo_folder, tmp_path, caplog, capsys):
    from adclr.cli import main
    from adclr.errors import InvalidSettingError

    train(_cfg(photo_folder, tmp_path / "run", epochs=1))
    with caplog.at_level("WARNING", logger="adclr.train.engine"):
        extended = Trainer(_cfg(photo_folder, tmp_path / "run", epochs=2), resume=True)
        extended.fit()
    assert "epochs: 1 -> 2" in caplog.text and (extended.epoch, extended.step) == (2, 8)
    train(_cfg(photo_folder, tmp_path / "planned", epochs=2))
    logged = lambda run: [(r["step"], r["lr"], r["wd"], r["momentum"]) for r in _records(run) if r.get("epoch") == 1]
    assert logged(tmp_path / "run") == logged(tmp_path / "planned")  # the second epoch as a 2-epoch run has it

    files = {p: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(InvalidSettingError, match="--epochs 1 is fewer than the 2 epochs the checkpoint"):
        Trainer(_cfg(photo_folder, tmp_path / "run", epochs=1), resume=True)
    args = ["train", "--resume", "--data", str(photo_folder), "--output", str(tmp_path / "run"), *_flags(TINY)]
    capsys.readouterr()
    assert main(args + ["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("adclr train: error: --epochs 1 is fewer") and "Traceback" not in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").iterdir()} == files  # refused before anything was written


def test_killed_run_resumes_with_each_step_logged_once_and_no_stale_temporary(photo_folder, tmp_path):
    cmd = [sys.executable, "-m", "adclr.train", "--data", str(photo_folder), "--output", str(tmp_path),
           *_flags({**TINY, "epochs": 2, "batch_size": 2})]  # 8 steps per epoch: time to kill one mid-epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and '"epoch": 1,' in metrics.read_text()):  # a step after the first checkpoint
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    done = read_training_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"]
    assert any(r.get("epoch") == done for r in _records(tmp_path))  # logged steps the checkpoint does not hold
    stale = tmp_path / f".{CHECKPOINT_NAME}.k1ll3d.tmp"  # what a kill during a save leaves: a cut checkpoint
    stale.write_bytes((tmp_path / CHECKPOINT_NAME).read_bytes()[:5000])

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["step"] for r in records if "epoch_end" not in r] == list(range(1, 17))
    assert [r["epoch_end"] for r in records if "epoch_end" in r] == [1, 2]
    assert not stale.exists()
